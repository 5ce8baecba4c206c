"""One run per train.out_dir (hpc_asr.train.lock): a second run started while a first trains
(real mpirun, 2 ranks each) refuses with one line naming the holder and leaves the first alone;
a stale lock (its process gone on this host; its SLURM job no longer running, asked of a real
slurmctld) is taken over with a warning."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import helpers
import pytest
import slurm_cluster as sc
from conftest import ROOT, mpirun_cmd, run, run_env
from helpers import tiny_yaml, wait_file

import hpc_asr.train.loop as train_mod
from hpc_asr.cli import load_config
from hpc_asr.train.lock import LOCK_NAME, OutDirLocked, acquire

tiny_features = helpers.tiny_features
slurm_cluster = sc.slurm_cluster
HOST = socket.gethostname()




def test_second_concurrent_run_refuses_naming_the_holder(tiny_features, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_yaml(tmp_path / "c.yaml", tiny_features["train"], tiny_features["dev"], out,
                    train={"epochs": 3, "tensorboard": False})
    cmd = mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg))
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**run_env(), "HPC_ASR_TEST_WAIT_SIGNAL": "2:0"})  # rank 0 pauses at step 2
    try:
        pid0 = int(wait_file(out / "waiting.rank0", first))
        metrics = (out / "metrics.jsonl").read_text()
        second = run(cmd, check=False, timeout=180)
        assert second.returncode == 2, second.stderr
        expected = (f"error: train.out_dir {out} is in use by another run (pid {pid0} on {HOST}, since "
                    f"{json.loads((out / LOCK_NAME).read_text())['since']}): wait for it, use another "
                    f"train.out_dir, or remove {out / LOCK_NAME} if that run is gone")
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        # every rank stops with that line (mpirun may kill the second before it prints: one or two copies)
        assert errors and set(errors) == {expected} and "Traceback" not in second.stderr, second.stderr
        assert (out / "metrics.jsonl").read_text() == metrics  # the first run's files untouched
        os.kill(pid0, signal.SIGUSR1)  # the first run checkpoints and exits 3 ...
        _, err = first.communicate(timeout=180)
        assert first.returncode == train_mod.EXIT_PREEMPTED, err
        assert not (out / LOCK_NAME).exists()  # ... releasing the lock on its way out
    finally:
        if first.poll() is None:
            first.kill()


def test_lock_is_released_when_train_returns(tiny_features, tmp_path):
    """A run that ends frees its out_dir at once, not at process exit: a later run in another
    process (an evaluation chain, a resume with more ranks) is not refused by a finished one."""
    out = tmp_path / "run"
    cfg = tiny_yaml(tmp_path / "c.yaml", tiny_features["train"], tiny_features["dev"], out,
                    train={"epochs": 1, "max_steps": 1, "tensorboard": False})
    train_mod.train(load_config(cfg, ["--dist.engine", "none"]))
    assert not (out / LOCK_NAME).exists()
    proc = run([sys.executable, "-m", "hpc_asr", "train", "--config", str(cfg), "--dist.engine", "none",
                "--train.max_steps", "2"], timeout=180)
    assert proc.returncode == 0, proc.stderr


def test_lock_of_a_live_process_stands_a_dead_ones_is_taken_over(tiny_features, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    holder = subprocess.Popen(["sleep", "60"])
    lock.write_text(json.dumps({"host": HOST, "pid": holder.pid, "since": "2026-01-01T00:00:00Z"}))
    cfg = load_config(tiny_yaml(tmp_path / "c.yaml", tiny_features["train"], tiny_features["dev"], out,
                                train={"max_steps": 1, "tensorboard": False}), ["--dist.engine", "none"])
    with pytest.raises(OutDirLocked, match=f"in use by another run \\(pid {holder.pid} on {HOST}"):
        train_mod.train(cfg)
    assert not (out / "metrics.jsonl").exists()
    holder.kill()
    holder.wait()
    train_mod.train(cfg)
    assert (f"warning: took over the stale lock {lock} of pid {holder.pid} on {HOST}, since 2026-01-01T00:00:00Z: "
            f"its process {holder.pid} is gone") in (out / "train.rank0.log").read_text()
    assert not lock.exists()  # released when train() returned
    train_mod.train(cfg)  # a later run in the same process (its first run has returned) takes it quietly
    assert (out / "train.rank0.log").read_text().count("took over") == 1


def test_lock_of_a_slurm_job_elsewhere_stands_while_it_runs(slurm_cluster, tmp_path, monkeypatch):
    """The holder ran on another node: only the scheduler can tell whether it still runs."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    jid = slurm_cluster.run("sbatch", "--parsable", "-o", "/dev/null", "-D", str(tmp_path),
                            "--wrap", "sleep 120").stdout.strip()
    deadline = time.time() + 60
    while slurm_cluster.job(jid).get("JobState") != "RUNNING":
        assert time.time() < deadline, slurm_cluster.job(jid)
        time.sleep(0.5)
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "job": jid, "scheduler": "slurm",
                                "restart": "0", "since": "2026-01-01T00:00:00Z"}))
    with pytest.raises(OutDirLocked, match=f"\\(job {jid}, pid 4242 on node-elsewhere, since"):
        acquire(tmp_path)
    slurm_cluster.run("scancel", jid)
    while slurm_cluster.job(jid).get("JobState") in ("RUNNING", "COMPLETING"):
        assert time.time() < deadline + 60, slurm_cluster.job(jid)
        time.sleep(0.5)
    taken = acquire(tmp_path)
    assert taken.warning.endswith(f"job {jid} is no longer running (squeue)"), taken.warning
    taken.release()
    assert not lock.exists()
