"""Rendered job scripts: directives parsed back, resource validation, CPU-only, PBS, dry-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from conftest import ROOT

from hpc_asr.jobs import load_site, parse_directives

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
    proc = subprocess.run([sys.executable, "-m", "hpc_asr.jobs", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpc_asr.jobs {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def render(tmp_path: Path, *args: str, **site) -> dict[str, str]:
    out = tmp_path / "jobs"
    jobs("render", "--site", str(site_file(tmp_path, **site)), "--out", str(out),
         "--config", str(ROOT / "hpc_asr" / "configs" / "demo.yaml"), *args)
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
    assert "srun --mpi=pmix --kill-on-bad-exit=1 --cpu-bind=none python -m hpc_asr.train" in text
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in text and "export OMP_NUM_THREADS=8" in text
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "module load hpc_asr/0.1.0" in text and 'NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap warn USR1 TERM" in text
    prep = parse_directives(scripts["prep"])
    assert prep["nodes"] == ["4"] and "gpus-per-node" not in prep and prep["time"] == ["01:00:00"]
    assert scripts["prep"].count("python -m data_prep.fbank") == 3  # train, dev, test in one job
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
    assert "( sleep 43080 && kill -USR1 $$ ) &" in text  # the warning 120 s before 12 h
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
                "--scheduler", "slurm", "--gpus-per-node", "8")
    out = proc.stdout
    assert out.count("#!/bin/bash") == 4
    assert "PREP_ID=$(sbatch --parsable " in out
    assert "TRAIN_ID=$(sbatch --parsable '--dependency=afterok:$PREP_ID' " in out
    assert "EXPORT_ID=$(sbatch --parsable '--dependency=afterok:$EVALUATE_ID' " in out
    proc = jobs("submit", "--dry-run", "--site", str(site_file(tmp_path)), "--out", str(tmp_path / "p"),
                "--scheduler", "pbs", "--gpus-per-node", "8")
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
    assert "--ntasks-per-node=1 --ntasks=$SLURM_NNODES python -m hpc_asr.stage" in text
    assert '--data.train="$STAGE_DIR/train" --data.dev="$STAGE_DIR/dev"' in text


@pytest.mark.parametrize("flag", ["--nodes=0", "--gpus-per-node=-1"])
def test_bad_counts(tmp_path, flag):
    proc = jobs("render", "--site", str(site_file(tmp_path)), "--out", str(tmp_path / "o"), flag, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --nodes")


# ---- node-local staging --------------------------------------------------------------------

def test_stage_once_per_node_under_mpirun(tiny_features, tmp_path):
    from conftest import mpirun_cmd, run

    dest = tmp_path / "local"
    proc = run(mpirun_cmd(2, "-m", "hpc_asr.stage", "--dest", str(dest), str(tiny_features["train"]),
                          str(tiny_features["dev"])), timeout=120)
    assert proc.stderr.count("sha256 verified") == 2 and proc.stderr.count("up to date") == 2  # one copier
    for split in ("train", "dev"):
        src = {p.name: p.read_bytes() for p in tiny_features[split].iterdir()}
        got = {p.name: p.read_bytes() for p in (dest / split).iterdir() if p.name != ".staged.json"}
        assert got == src
    from hpc_asr.data import FeatureSet

    assert len(FeatureSet(dest / "train")) == len(FeatureSet(tiny_features["train"]))


def test_stage_recopies_changed_source_and_rejects_bad_copy(tmp_path, monkeypatch):
    import shutil as sh

    from helpers import make_feature_dir

    from hpc_asr import stage as st

    src = make_feature_dir(tmp_path / "shared" / "train", 4, seed=2, shards=2)
    rows = st.stage([src], tmp_path / "local")
    assert rows[0]["copied"] == 3 and not rows[0]["reused"]
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
    missing = subprocess.run([sys.executable, "-m", "hpc_asr.stage", "--dest", str(tmp_path / "x"),
                              str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: staging: {tmp_path / 'nope'}: source directory not found"
