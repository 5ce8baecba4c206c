"""Rendered job scripts: directives parsed back, resource validation, CPU-only, PBS, dry-run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from conftest import ROOT

from hpc_asr import checkpoint
from hpc_asr.ops.jobs import load_site, parse_directives

tiny_features = helpers.tiny_features


def site_file(tmp_path: Path, **over) -> Path:
    site = {"scheduler": "slurm", "partition": "gpu", "account": "asr42", "walltime": "12:00:00",
            "prep_walltime": "01:00:00", "node_cpus": 64, "cpus_per_task": 8, "cpu_ranks_per_node": 4,
            "cpu_bind": "cores", "env": {"modules": ["hpc_asr/0.1.0"], "venv": ""},
            "nccl_env": str(ROOT / "env" / "nccl.env"), "local_scratch": "/local", "requeue_signal_s": 120}
    site.update(over)
    p = tmp_path / "site.yaml"
    p.write_text(json.dumps(site))
    return p


def jobs(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hpc_asr", "jobs", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpc_asr.ops.jobs {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def render(tmp_path: Path, *args: str, config: str = "demo.yaml", **site) -> dict[str, str]:
    """Render a recipe's chain; the recipe's data is not prepared here, so no path check."""
    out = tmp_path / "jobs"
    jobs("render", "--site", str(site_file(tmp_path, **site)), "--out", str(out),
         "--config", str(ROOT / "hpc_asr" / "configs" / config), "--no-path-check", *args)
    return {p.stem: p.read_text() for p in out.iterdir() if p.suffix in (".sbatch", ".pbs")}


def test_slurm_gpu_directives_and_launch(tmp_path):
    scripts = render(tmp_path, "--scheduler", "slurm", "--nodes", "4", "--gpus-per-node", "8")
    assert sorted(scripts) == ["evaluate", "export", "prep", "train"]
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


def test_bad_site_file_is_one_line(tmp_path):
    bad = site_file(tmp_path, partiton="gpu")
    proc = jobs("render", "--site", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "unknown key(s) ['partiton']" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    bad = site_file(tmp_path, node_cpus="many")
    proc = jobs("render", "--site", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "node_cpus must be an integer" in proc.stderr


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


def test_shipped_site_file_loads():
    site = load_site(ROOT / "env" / "site.yaml")
    assert site.scheduler == "slurm" and site.cpus_per_task * 8 <= site.node_cpus
    keys = dict(site.nccl_vars())
    assert keys["HDF5_USE_FILE_LOCKING"] == "FALSE" and keys["NCCL_IB_DISABLE"] == "0"


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


# ---- node-local staging --------------------------------------------------------------------

def test_stage_once_per_node_under_mpirun(tiny_features, tmp_path):
    from conftest import mpirun_cmd, run

    dest = tmp_path / "local"
    proc = run(mpirun_cmd(2, "-m", "hpc_asr", "stage", "--dest", str(dest), str(tiny_features["train"]),
                          str(tiny_features["dev"])), timeout=120)
    assert proc.stderr.count("sha256 verified") == 2 and proc.stderr.count("up to date") == 2  # one copier
    for split in ("train", "dev"):
        src = {p.relative_to(tiny_features[split]): p.read_bytes() for p in tiny_features[split].rglob("*")
               if p.is_file()}
        got = {p.relative_to(dest / split): p.read_bytes() for p in (dest / split).rglob("*")
               if p.is_file() and p.name != ".staged.json"}
        assert got == src
    from hpc_asr.data.loader import FeatureSet

    assert len(FeatureSet(dest / "train")) == len(FeatureSet(tiny_features["train"]))


def test_stage_recopies_changed_source_and_rejects_bad_copy(tmp_path, monkeypatch):
    import shutil as sh

    from helpers import make_feature_dir

    from hpc_asr.ops import stage as st

    src = make_feature_dir(tmp_path / "shared" / "train", 4, seed=2, shards=2)
    rows = st.stage([src], tmp_path / "local")
    n_files = sum(1 for p in src.rglob("*") if p.is_file())
    assert rows[0]["copied"] == n_files >= 3 and not rows[0]["reused"]
    assert st.stage([src], tmp_path / "local")[0]["reused"]
    make_feature_dir(src, 6, seed=3, shards=2)  # the shared copy was re-prepared
    assert not st.stage([src], tmp_path / "local")[0]["reused"]

    real_copy = sh.copyfile

    def short_copy(a, b):  # a copy cut short (full node-local disk, flaky mount)
        real_copy(a, b)
        with open(b, "r+b") as f:
            f.truncate(10)

    monkeypatch.setattr(st.shutil, "copyfile", short_copy)
    with pytest.raises(st.StageError, match="copy differs from"):
        st.stage([src], tmp_path / "other")
    assert not (tmp_path / "other" / "train").exists()  # nothing half-copied is published
    missing = subprocess.run([sys.executable, "-m", "hpc_asr", "stage", "--dest", str(tmp_path / "x"),
                              str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: staging: {tmp_path / 'nope'}: source directory not found"


# ---- PBS, run the way a MOM runs a job ------------------------------------------------------
# No PBS server is packaged for Debian: the scripts are run by bash with the environment a PBS
# MOM gives a job ($PBS_NODEFILE with one line per MPI slot, $PBS_O_WORKDIR, $PBS_JOBID,
# $TMPDIR), so hostfile handling, the mpirun line and staging execute for real.

def pbs_site(tmp_path: Path, **over) -> Path:
    return site_file(tmp_path, scheduler="pbs", partition="workq", account="", node_cpus=os.cpu_count(),
                     cpus_per_task=1, cpu_ranks_per_node=2, cpu_bind="none", local_scratch="${TMPDIR:-/tmp}",
                     env={"modules": [], "venv": str(ROOT / ".venv")}, **over)


def mom_env(script: Path, tmp_path: Path, job_id: str, slots: int = 2, path_extra: Path | None = None) -> dict:
    """The environment a PBS MOM gives a job, with $PBS_NODEFILE listing this host ``slots`` times."""
    from conftest import run_env

    nodefile = tmp_path / f"nodefile.{job_id}"
    nodefile.write_text(f"{socket.gethostname()}\n" * slots)
    scratch = tmp_path / "mom-tmp"
    scratch.mkdir(exist_ok=True)
    env = {**run_env(), "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(ROOT), "PBS_JOBID": job_id,
           "PBS_JOBNAME": script.stem, "PBS_ENVIRONMENT": "PBS_BATCH", "TMPDIR": str(scratch)}
    if path_extra:
        env["PATH"] = f"{path_extra}:{env['PATH']}"
    return env


def run_like_mom(script: Path, tmp_path: Path, job_id: str, slots: int = 2, path_extra: Path | None = None,
                 timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=Path.home(), timeout=timeout,
                          env=mom_env(script, tmp_path, job_id, slots, path_extra))


def _qrerun_stub(tmp_path: Path) -> Path:
    """The PBS server's qrerun, recording its call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qrerun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'qrerun.args'}\n")
    (bin_dir / "qrerun").chmod(0o755)
    return bin_dir


def _pbs_config(tmp_path: Path, feats: dict[str, Path], out: Path, **train) -> Path:
    cfg = {"data": {**{k: str(v) for k, v in feats.items()}, "max_frames": 4000, "max_utts": 2},
           "specaug": {"enabled": False},
           "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "ff_mult": 2, "conv_kernel": 5,
                     "subsample_channels": 8, "dropout": 0.0},
           "train": {"out_dir": str(out), "epochs": 3, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                     "threads": 1, **train}}
    p = tmp_path / "tiny.yaml"
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.slow
def test_pbs_chain_runs_under_mom_environment(tmp_path):
    corpus = tmp_path / "va"
    synth = subprocess.run([sys.executable, "-m", "hpc_asr", "prep", "voice-assistant", "--out", str(corpus),
                            "--hours", "0.01",
                            "--dev-utts", "4", "--test-utts", "4", "--jobs", "1"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
    assert synth.returncode == 0, synth.stderr
    feats = {s: corpus / "fbank" / s for s in ("train", "dev", "test")}
    out = tmp_path / "run"
    cfg = _pbs_config(tmp_path, feats, out)
    jobs("render", "--site", str(pbs_site(tmp_path)), "--out", str(tmp_path / "jobs"), "--gpus-per-node", "0",
         "--config", str(cfg), "--stage")
    for n, stage in enumerate(("prep", "train", "evaluate", "export")):
        proc = run_like_mom(tmp_path / "jobs" / f"{stage}.pbs", tmp_path, f"{100 + n}.pbs-server")
        assert proc.returncode == 0, f"{stage}: {proc.stdout}\n{proc.stderr}"
        if stage == "train":
            staged = tmp_path / "mom-tmp" / "hpc_asr-101.pbs-server"
            assert proc.stderr.count("sha256 verified") == 2, proc.stderr  # one copier on the one node
            state = checkpoint.load(out / "last.pt")
            assert state["config"]["data"]["train"] == str(staged / "train")  # trained on the copy
            assert not staged.exists()  # removed when the job ended
    assert json.loads((feats["train"] / "index.json").read_text())["ranks"] == 2  # prep: mpirun -np 2
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["ranks"] == 2 and summary["engine"] == "horovod"
    n_test = len((corpus / "test.jsonl").read_text().splitlines())
    assert json.loads((out / "eval.json").read_text())["utterances"] == n_test
    assert (out / "export" / "model.onnx").is_file()


def test_staged_copy_is_removed_when_the_train_job_fails(tiny_features, tmp_path):
    """issue 17.8: the node-local copy stayed on scratch after the job, failed or not."""
    (tmp_path / "a-file").write_text("")  # train.out_dir below a file: training fails at once
    cfg = _pbs_config(tmp_path, {"train": tiny_features["train"], "dev": tiny_features["dev"],
                                 "test": tiny_features["dev"]}, tmp_path / "a-file" / "run")
    jobs("render", "--site", str(pbs_site(tmp_path)), "--out", str(tmp_path / "jobs"), "--gpus-per-node", "0",
         "--config", str(cfg), "--stage", "--no-path-check")
    proc = run_like_mom(tmp_path / "jobs" / "train.pbs", tmp_path, "8.pbs-server", timeout=180)
    assert proc.returncode != 0 and "[job] train exited" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count("sha256 verified") == 2, proc.stderr  # the copy was made ...
    assert list((tmp_path / "mom-tmp").iterdir()) == []  # ... and is gone


def test_pbs_walltime_warning_checkpoints_and_asks_for_rerun(tiny_features, tmp_path):
    """PBS has no warning-signal directive; the rendered job's own timer sends USR1 120 s before
    the walltime, mpirun forwards it, the ranks checkpoint and exit 3, and the job asks qrerun."""
    out = tmp_path / "run"
    cfg = _pbs_config(tmp_path, {"train": tiny_features["train"], "dev": tiny_features["dev"],
                                 "test": tiny_features["dev"]}, out, epochs=100000)
    jobs("render", "--site", str(pbs_site(tmp_path, requeue_signal_s=120)), "--out", str(tmp_path / "jobs"),
         "--gpus-per-node", "0", "--config", str(cfg), "--walltime", "00:02:25")  # warning after 25 s
    bin_dir = _qrerun_stub(tmp_path)
    text = (tmp_path / "jobs" / "train.pbs").read_text().replace("sleep 300", "sleep 0")
    (tmp_path / "jobs" / "train.pbs").write_text(text)  # the MOM would end the job at qrerun
    proc = run_like_mom(tmp_path / "jobs" / "train.pbs", tmp_path, "7.pbs-server", path_extra=bin_dir, timeout=120)
    assert "[job] warning signal" in proc.stdout, proc.stdout + proc.stderr
    assert "requeueing" in proc.stdout
    assert proc.returncode == 3 and (tmp_path / "qrerun.args").read_text().strip() == "7.pbs-server"
    state = checkpoint.load(out / "last.pt")
    assert "preempted (signal)" in (out / "train.rank0.log").read_text()
    assert state["position"]["step"] > 0


# ---- where the site file comes from ---------------------------------------------------------

def _installed_copy(tmp_path: Path) -> Path:
    """hpc_asr installed non-editable into a fresh venv, as env/setup-local.sh --no-editable does
    (the shared venv's packages reachable through a .pth, the checkout not at all)."""
    import shutil
    import sysconfig

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "data", "runs", "tests", "jobs",
                                                               "__pycache__", "*.egg-info", "build", "docs"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "shared-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPC_ASR_SITE", "HPC_ASR_HOME")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          str(src)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert pip.returncode == 0, pip.stderr
    shutil.rmtree(src)  # nothing may come from the source tree
    where = subprocess.run([str(py), "-c", "import hpc_asr; print(hpc_asr.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert where.stdout.startswith(purelib), where.stdout + where.stderr
    return py


def test_an_installed_toolkit_renders_with_the_modules_site_file(tmp_path):
    """issue 17.2: after a non-editable install render looked for env/site.yaml and env/nccl.env
    under site-packages, and --site did not move the nccl.env lookup."""
    py = _installed_copy(tmp_path)
    prefix = tmp_path / "prefix" / "env"  # what provision.sh leaves: PREFIX/env/{site.yaml,nccl.env}
    prefix.mkdir(parents=True)
    for name in ("site.yaml", "nccl.env"):
        (prefix / name).write_text((ROOT / "env" / name).read_text())
    (prefix / "nccl.env").write_text((ROOT / "env" / "nccl.env").read_text() + "NCCL_FROM_MODULE=1\n")
    work = tmp_path / "project"  # a user's directory, outside the checkout, with its data
    (work / "va").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (work / "va" / f"{split}.jsonl").write_text("")
    (work / "tiny.yaml").write_text(json.dumps({"data": {s: f"va/fbank/{s}" for s in ("train", "dev", "test")}}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPC_ASR_SITE", "HPC_ASR_HOME")}

    def render_here(*extra: str, **more_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(py), "-m", "hpc_asr", "jobs", "render", "--config", "tiny.yaml", "--out", "jobs",
                               "--gpus-per-node", "8", *extra], capture_output=True, text=True, cwd=work,
                              env={**env, **more_env}, timeout=120)

    proc = render_here()  # no site file anywhere: one line, never the package directory's
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: no site file: pass --site FILE, set HPC_ASR_SITE, or `module load hpc_asr`")
    for how in (["--site", str(prefix / "site.yaml")], []):  # --site, then $HPC_ASR_SITE as the module sets it
        proc = render_here(*how, **({} if how else {"HPC_ASR_SITE": str(prefix / "site.yaml")}))
        assert proc.returncode == 0, proc.stderr
        train = (work / "jobs" / "train.sbatch").read_text()
        assert 'export NCCL_FROM_MODULE="${NCCL_FROM_MODULE:-1}"' in train  # nccl.env beside the site file
        assert "module load hpc_asr" in train
        assert "--manifest va/train.jsonl" in (work / "jobs" / "prep.sbatch").read_text()
    proc = render_here(HPC_ASR_HOME=str(prefix.parent))  # an older modulefile: only HPC_ASR_HOME
    assert proc.returncode == 0, proc.stderr


def test_site_module_prints_and_installs_the_presets(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("nccl_env: presets/nccl.env\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "nccl.env").write_text("# why\nNCCL_IB_DISABLE=0\n")
    run = [sys.executable, "-m", "hpc_asr.ops.site"]
    proc = subprocess.run([*run, "nccl-env", "--site", str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout == "NCCL_IB_DISABLE=0\n", proc.stderr
    proc = subprocess.run([*run, "install", "--site", str(site), "--dest", str(tmp_path / "p" / "env")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p" / "env" / "presets" / "nccl.env").read_text().endswith("NCCL_IB_DISABLE=0\n")
    assert load_site(tmp_path / "p" / "env" / "site.yaml").nccl_vars() == [("NCCL_IB_DISABLE", "0")]
    (tmp_path / "presets" / "nccl.env").write_text("export NCCL_IB_DISABLE=0\n")  # provision.sh used to take this
    proc = subprocess.run([*run, "nccl-env", "--site", str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    bad = tmp_path / "presets" / "nccl.env"
    assert proc.stderr == f"error: {bad}:1: expected KEY=VALUE, got 'export NCCL_IB_DISABLE=0'\n"


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
    assert [p.stem for p in scripts] == sorted(["prep", "train", "evaluate", "export"])
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


def test_pbs_qdel_stops_training_at_a_checkpoint_without_rerun(tiny_features, tmp_path):
    """issue 17.1 under PBS: qdel (TERM to every process of the job, KILL after kill_delay) ends
    the job after the ranks checkpoint; only the walltime warning asks for qrerun."""
    import signal
    import time

    out = tmp_path / "run"
    cfg = _pbs_config(tmp_path, {"train": tiny_features["train"], "dev": tiny_features["dev"],
                                 "test": tiny_features["dev"]}, out, epochs=100000)
    jobs("render", "--site", str(pbs_site(tmp_path)), "--out", str(tmp_path / "jobs"), "--gpus-per-node", "0",
         "--config", str(cfg), "--walltime", "01:00:00", "--no-path-check")
    script = tmp_path / "jobs" / "train.pbs"
    env = mom_env(script, tmp_path, "9.pbs-server", path_extra=_qrerun_stub(tmp_path))
    log = tmp_path / "job.out"
    with open(log, "w") as f:
        job = subprocess.Popen(["bash", str(script)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=Path.home(),
                               start_new_session=True)
    try:
        rank0, t0 = out / "train.rank0.log", time.time()
        while " step 2/" not in (rank0.read_text() if rank0.is_file() else "") and time.time() - t0 < 120:
            time.sleep(0.5)
        os.killpg(job.pid, signal.SIGTERM)  # qdel
        rc = job.wait(timeout=10)  # PBS's default kill_delay: KILL after 10 s
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert "[job] stopped" in text and "requeueing" not in text, text
    assert not (tmp_path / "qrerun.args").exists() and rc != 0, text  # mpirun: 1 or 3
    assert "preempted (signal)" in rank0.read_text()
    assert checkpoint.load(out / "last.pt")["position"]["step"] >= 2
