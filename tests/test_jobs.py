"""Rendered job scripts: directives parsed back, every option validated, the paths a chain reads,
the checkpoint evaluate/export use, dry-run, and the checked-in chains in jobs/ kept identical to
what render makes. Running them: tests/test_slurm.py (real SLURM), tests/test_pbs.py (PBS MOM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from jobs_helpers import jobs, site_file

from hpc_asr.ops.jobs import load_site, parse_directives


def render(tmp_path: Path, *args: str, config: str = "demo.yaml", **site) -> dict[str, str]:
    """Render a recipe's chain; the recipe's data is not prepared here, so no path check."""
    out = tmp_path / "jobs"
    jobs("render", "--site", str(site_file(tmp_path, **site)), "--out", str(out),
         "--config", str(ROOT / "hpc_asr" / "configs" / config), "--no-path-check", *args)
    return {p.stem: p.read_text() for p in out.iterdir() if p.suffix in (".sbatch", ".pbs")}


def test_slurm_gpu_directives_and_launch(tmp_path):
    scripts = render(tmp_path, "--scheduler", "slurm", "--nodes", "4", "--gpus-per-node", "8")
    assert sorted(scripts) == ["evaluate", "export", "prep", "serve", "train"]
    serve = parse_directives(scripts["serve"])  # one node, one task, one GPU, never requeued
    assert serve["nodes"] == ["1"] and serve["ntasks-per-node"] == ["1"] and serve["gpus-per-node"] == ["1"]
    assert "requeue" not in serve and "signal" not in serve and serve["partition"] == ["gpu"]
    assert "--model-dir runs/demo/export --host 0.0.0.0 --port \"$PORT\" &" in scripts["serve"]
    d = parse_directives(scripts["train"])
    assert d["nodes"] == ["4"] and d["ntasks-per-node"] == ["8"] and d["gpus-per-node"] == ["8"]
    assert d["cpus-per-task"] == ["8"] and d["time"] == ["12:00:00"] and d["partition"] == ["gpu"]
    assert d["account"] == ["asr42"] and d["signal"] == ["B:USR1@120"] and "requeue" in d
    assert d["open-mode"] == ["append"] and d["output"][0].endswith("logs/%x-%j.out")
    text = scripts["train"]
    assert "srun --mpi=pmix --kill-on-bad-exit=1 --cpu-bind=none python -m hpc_asr train" in text
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in text and "export OMP_NUM_THREADS=8" in text
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "module load hpc_asr/0.1.0" in text and 'NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap warn USR1\ntrap stop TERM\n" in text
    prep = parse_directives(scripts["prep"])
    assert prep["nodes"] == ["4"] and "gpus-per-node" not in prep and prep["time"] == ["01:00:00"]
    assert scripts["prep"].count("python -m hpc_asr prep fbank") == 3  # train, dev, test in one job
    assert scripts["prep"].count("--threads 8") == 3  # the 8 CPUs per rank it asks for are used
    ev = parse_directives(scripts["evaluate"])
    assert ev["nodes"] == ["1"] and ev["ntasks-per-node"] == ["1"] and ev["gpus-per-node"] == ["1"]
    for text in scripts.values():  # every script is valid bash
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_cpu_only_cluster(tmp_path):
    scripts = render(tmp_path, "--scheduler", "slurm", "--nodes", "2", "--gpus-per-node", "0",
                     "--cpus-per-task", "16")
    d = parse_directives(scripts["train"])
    assert "gpus-per-node" not in d and d["ntasks-per-node"] == ["4"] and d["cpus-per-task"] == ["16"]
    assert "--cpu-bind=cores" in scripts["train"]  # CPU ranks get pinned, GPU ranks don't
    assert "gpus-per-node" not in parse_directives(scripts["evaluate"])


def test_pbs_directives_and_mpirun(tmp_path):
    scripts = render(tmp_path, "--scheduler", "pbs", "--nodes", "4", "--gpus-per-node", "8")
    d = parse_directives(scripts["train"])
    assert d["l"] == ["select=4:ncpus=64:ngpus=8:mpiprocs=8", "place=scatter", "walltime=12:00:00"]
    assert d["q"] == ["gpu"] and d["A"] == ["asr42"] and d["r"] == ["y"] and d["N"] == ["hpc_asr-train"]
    text = scripts["train"]
    assert 'mpirun -np $((NODES*8)) --hostfile "$PBS_NODEFILE" -bind-to none -map-by slot' in text
    assert "-x NCCL_IB_DISABLE" in text and "-x MASTER_ADDR" in text
    assert 'export MASTER_ADDR=$(head -n 1 "$PBS_NODEFILE")' in text
    assert "( sleep 43080 && kill -USR1 $$ ) </dev/null >/dev/null 2>&1 &" in text  # 120 s before 12 h
    assert parse_directives(scripts["prep"])["l"][0] == "select=4:ncpus=64:mpiprocs=8"


def test_cpus_per_task_must_fit_the_node(tmp_path):
    # The old script hard-coded --cpus-per-task=8: on a smaller node the job stayed PENDING forever.
    proc = jobs("render", "--site", str(site_file(tmp_path, node_cpus=2)), "--out", str(tmp_path / "o"),
                "--gpus-per-node", "0", "--ranks-per-node", "2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cpus-per-task 8 x 2 ranks per node = 16 CPUs > 2 per node (--node-cpus, or "
        f"{tmp_path / 'site.yaml'}: node_cpus); lower --cpus-per-task or --ranks-per-node"]
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_scripts_and_chain(tmp_path):
    proc = jobs("submit", "--dry-run", "--site", str(site_file(tmp_path)), "--out", str(tmp_path / "o"),
                "--scheduler", "slurm", "--gpus-per-node", "8", "--no-path-check")
    out = proc.stdout
    assert out.count("#!/bin/bash") == 4
    assert "PREP_ID=$(sbatch --parsable " in out
    assert "TRAIN_ID=$(sbatch --parsable '--dependency=afterok:$PREP_ID' " in out
    assert "EXPORT_ID=$(sbatch --parsable '--dependency=afterok:$EVALUATE_ID' " in out
    proc = jobs("submit", "--dry-run", "--site", str(site_file(tmp_path)), "--out", str(tmp_path / "p"),
                "--scheduler", "pbs", "--gpus-per-node", "8", "--no-path-check")
    assert "TRAIN_ID=$(qsub -W depend=afterok:\\$PREP_ID" in proc.stdout or \
        "TRAIN_ID=$(qsub -W 'depend=afterok:$PREP_ID'" in proc.stdout


def test_stage_option_points_training_at_the_copy(tmp_path):
    scripts = render(tmp_path, "--scheduler", "slurm", "--gpus-per-node", "8", "--stage")
    text = scripts["train"]
    assert 'STAGE_DIR="/local/hpc_asr-$SLURM_JOB_ID"' in text
    assert "--ntasks-per-node=1 --ntasks=$SLURM_NNODES python -m hpc_asr stage" in text
    assert '--data.train="$STAGE_DIR/train" --data.dev="$STAGE_DIR/dev"' in text
    assert "trap unstage EXIT" in text and "--ntasks=$SLURM_NNODES rm -rf \"$STAGE_DIR\"" in text


WALL = "minutes and seconds must be < 60 (hours < 24 after a day count)"


@pytest.mark.parametrize("flags, line", [
    (["--nodes=0"], "--nodes must be >= 1, got 0"),
    (["--gpus-per-node=-1"], "--gpus-per-node must be >= 0, got -1"),
    (["--ranks-per-node=-2"], "--ranks-per-node must be >= 0, got -2"),
    (["--cpus-per-task=-4"], "--cpus-per-task must be >= 0, got -4"),
    (["--node-cpus=-1"], "--node-cpus must be >= 0, got -1"),
    (["--walltime=99:99:99"], "--walltime '99:99:99': " + WALL),
    (["--walltime=1-30:00:00"], "--walltime '1-30:00:00': " + WALL),
    (["--walltime=soon"], "--walltime 'soon': expected [D-]HH:MM:SS"),
    (["--walltime=00:00:00"], "--walltime '00:00:00': must be longer than 0"),
    (["--prep-walltime=4h"], "--prep-walltime '4h': expected [D-]HH:MM:SS"),
    (["--serve-port=0"], "--serve-port must be > 0, got 0"),
    (["--serve-port=70000"], "--serve-port must be <= 65535, got 70000"),
    (["--serve-walltime=99:99:99"], "--serve-walltime '99:99:99': " + WALL),
    (["--walltime=00:01:00"], "SITE: requeue_signal_s 120 leaves no training time in a train walltime of 00:01:00 "
                              "(60 s); lower it or raise --walltime"),
])
def test_every_option_is_validated_in_one_line(tmp_path, flags, line):
    """issue 17.4: nonsense was rendered into scripts the scheduler then refused or ran wrong."""
    site = site_file(tmp_path)
    proc = jobs("render", "--site", str(site), "--out", str(tmp_path / "o"), "--no-path-check", *flags, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: " + line.replace("SITE", str(site))]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key, value, line", [
    ("prep_walltime", "99:99:99", "SITE: prep_walltime '99:99:99': minutes and seconds must be < 60"),
    ("cpus_per_task", 0, "SITE: site.cpus_per_task must be >= 1, got 0"),
    ("requeue_signal_s", -5, "SITE: site.requeue_signal_s must be >= 0, got -5"),
])
def test_site_values_are_validated_in_one_line(tmp_path, key, value, line):
    site = site_file(tmp_path, **{key: value})
    proc = jobs("render", "--site", str(site), "--out", str(tmp_path / "o"), "--no-path-check", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: " + line.replace("SITE", str(site))), proc.stderr


# ---- what the chain reads: manifests, shards, the checkpoint ----------------------------------

def _ls_tree(root: Path, splits=("train-clean-100", "dev-clean", "test-clean")) -> None:
    for s in splits:
        (root / "data" / "ls").mkdir(parents=True, exist_ok=True)
        (root / "data" / "ls" / f"{s}.jsonl").write_text("")


def test_render_names_the_first_path_the_chain_cannot_read(tmp_path):
    """issue 17.7: the prep job read data/ls/train.jsonl while the librispeech100 recipe (and its
    own comment) prepares data/ls/train-clean-100.jsonl; render now checks every input."""
    cfg = str(ROOT / "hpc_asr" / "configs" / "librispeech100.yaml")
    site = str(site_file(tmp_path))
    work = tmp_path / "work"
    _ls_tree(work)
    jobs("render", "--site", site, "--out", str(tmp_path / "ok"), "--config", cfg, "--workdir", str(work))
    prep = (tmp_path / "ok" / "prep.sbatch").read_text()
    for split in ("train-clean-100", "dev-clean", "test-clean"):
        assert f"--manifest data/ls/{split}.jsonl --out data/ls/fbank/{split}" in prep
    (work / "data" / "ls" / "dev-clean.jsonl").unlink()
    proc = jobs("render", "--site", site, "--out", str(tmp_path / "bad"), "--config", cfg, "--workdir", str(work),
                check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: the prep job reads data/ls/dev-clean.jsonl: not found under {work} and no earlier job in the "
        "chain writes it (prep makes data.<split>=DIR from CORPUS/<name of DIR>.jsonl; --corpus sets CORPUS); "
        "--no-path-check renders for another machine"]
    assert not (tmp_path / "bad").exists()


def test_evaluate_and_export_use_the_averaged_checkpoint_when_the_recipe_makes_one(tmp_path):
    """issue 17.8: the recipe sets train.average_last 10, yet evaluate/export read last.pt."""
    scripts = render(tmp_path, "--gpus-per-node", "8", config="librispeech100.yaml")
    for stage in ("evaluate", "export"):
        text = scripts[stage]
        assert "CKPT=runs/ls100/avg.pt\n" in text and "CKPT=runs/ls100/last.pt" in text  # fallback
        assert '--checkpoint "$CKPT"' in text and "last.pt --data" not in text
    (tmp_path / "demo").mkdir()
    other = render(tmp_path / "demo", "--gpus-per-node", "8")  # no average_last: the best dev WER
    assert "CKPT=runs/demo/best.pt\n" in other["evaluate"]
    proc = jobs("render", "--site", str(site_file(tmp_path)), "--out", str(tmp_path / "o"), "--no-path-check",
                "--config", str(ROOT / "hpc_asr" / "configs" / "librispeech100.yaml"))
    assert "evaluate and export use avg.pt (train.average_last=10" in proc.stdout


# ---- the checked-in chains (jobs/slurm, jobs/pbs, jobs/slurm-cpu) -----------------------------

REFERENCE = ("slurm", "pbs", "slurm-cpu")


def test_checked_in_chains_are_what_render_makes(tmp_path):
    """issue 18: the scripts in jobs/ are re-rendered by jobs/regenerate.sh in a copy of the files
    it reads, somewhere else on disk (so they also hold no machine-specific path), and must match."""
    import shutil

    for rel in ("env/site.yaml", "env/nccl.env", "jobs/regenerate.sh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "hpc_asr" / "configs", tmp_path / "hpc_asr" / "configs")
    proc = subprocess.run(["bash", str(tmp_path / "jobs" / "regenerate.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fix = "the code renders something else now: run jobs/regenerate.sh, review `git diff jobs/`, commit it"
    for d in REFERENCE:
        want = {p.name: p.read_text() for p in (tmp_path / "jobs" / d).iterdir() if p.is_file()}
        have = {p.name: p.read_text() for p in (ROOT / "jobs" / d).iterdir() if p.is_file()}
        assert sorted(have) == sorted(want), f"jobs/{d}: files {sorted(have)} != {sorted(want)}; {fix}"
        for name, text in want.items():
            if have[name] != text:
                old, new = [*have[name].splitlines(), ""], [*text.splitlines(), ""]
                i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
                raise AssertionError(f"jobs/{d}/{name} line {i + 1} differs: {old[i]!r} != {new[i]!r}; {fix}")


@pytest.mark.parametrize("d", REFERENCE)
def test_checked_in_chains_say_how_they_were_made(d):
    scripts = sorted(p for p in (ROOT / "jobs" / d).iterdir() if p.suffix in (".sbatch", ".pbs"))
    assert [p.stem for p in scripts] == sorted(["prep", "train", "evaluate", "export", "serve"])
    command = json.loads((ROOT / "jobs" / d / "jobs.json").read_text())["command"]
    assert command.startswith("hpc-asr jobs render ") and f"--out jobs/{d}" in command
    regenerate = " ".join((ROOT / "jobs" / "regenerate.sh").read_text().split()).replace("\\ ", "")
    assert " ".join(command.split()[3:]) in regenerate.replace('"${common[@]}"', "--site env/site.yaml --portable "
                                                                                   "--no-path-check")
    for p in scripts:
        lines = p.read_text().splitlines()
        assert lines[0] == "#!/bin/bash" and "generated by `hpc-asr jobs render`" in lines[1]
        assert lines[2] == f"#   {command}"
        subprocess.run(["bash", "-n", str(p)], check=True)


def test_docs_name_the_warning_signal_the_job_asks_for():
    """issue 17: docs/training.md said --signal=USR1@300 while the rendered job asks B:USR1@120.
    Every USR1@N in the user docs is the one in jobs/slurm/train.sbatch (itself checked against
    the code above)."""
    import re

    asked = parse_directives((ROOT / "jobs" / "slurm" / "train.sbatch").read_text())["signal"]
    assert asked == [f"B:USR1@{load_site(ROOT / 'env' / 'site.yaml').requeue_signal_s}"]
    docs = {p: (ROOT / p).read_text() for p in ("README.md", "docs/training.md", "jobs/README.md")}
    docs["docs/hpc.md"] = (ROOT / "docs" / "hpc.md").read_text().split("## What the tests run")[0]
    for name, text in docs.items():
        found = re.findall(r"[A-Z:]*USR1@\d+", text)
        assert set(found) <= {asked[0]}, f"{name}: {sorted(set(found))}, the job asks --signal={asked[0]}"
    assert asked[0] in docs["docs/training.md"] and asked[0] in docs["docs/hpc.md"]
