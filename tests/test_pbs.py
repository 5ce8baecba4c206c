"""Rendered PBS jobs run the way a MOM runs them (no PBS server is packaged for Debian): the chain,
the walltime warning → checkpoint → qrerun, qdel → checkpoint and no rerun, staging removed."""

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
from jobs_helpers import jobs, site_file

from hpc_asr import checkpoint

tiny_features = helpers.tiny_features


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
         "--gpus-per-node", "0", "--config", str(cfg), "--walltime", "00:03:00",
         "--no-path-check")  # warning after 60 s: start-up alone took > 25 s on a loaded 2-core machine
    bin_dir = _qrerun_stub(tmp_path)
    text = (tmp_path / "jobs" / "train.pbs").read_text().replace("sleep 300", "sleep 0")
    (tmp_path / "jobs" / "train.pbs").write_text(text)  # the MOM would end the job at qrerun
    proc = run_like_mom(tmp_path / "jobs" / "train.pbs", tmp_path, "7.pbs-server", path_extra=bin_dir, timeout=180)
    assert "[job] warning signal" in proc.stdout, proc.stdout + proc.stderr
    assert "requeueing" in proc.stdout
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert (tmp_path / "qrerun.args").read_text().strip() == "7.pbs-server"
    state = checkpoint.load(out / "last.pt")
    assert "preempted (signal)" in (out / "train.rank0.log").read_text()
    assert state["position"]["step"] > 0


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
