"""Signals sent to a real ``mpirun`` running 2 training ranks, against what docs/training.md says
they do. Open MPI's mpirun forwards SIGUSR1 to every rank (checkpoint, exit 3, and mpirun exits
3), but takes SIGTERM as "abort the job": TERM to the ranks, SIGKILL one second later, exit 1
whatever the ranks return (it refuses to forward TERM: ``ess_base_forward_signals`` rejects it)."""

from __future__ import annotations

import signal
import subprocess

import helpers
import pytest
from conftest import ROOT, mpirun_cmd, run_env
from helpers import tiny_yaml, wait_file

from hpc_asr import checkpoint

tiny_features = helpers.tiny_features




@pytest.mark.parametrize("sig, status", [(signal.SIGUSR1, 3), (signal.SIGTERM, 1)])
def test_signal_to_mpirun_exits_as_documented(sig, status, tiny_features, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_yaml(tmp_path / "c.yaml", tiny_features["train"], tiny_features["dev"], out,
                    train={"epochs": 3, "tensorboard": False})
    proc = subprocess.Popen(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**run_env(), "HPC_ASR_TEST_WAIT_SIGNAL": "2:0"})  # rank 0 waits at step 2
    try:
        wait_file(out / "waiting.rank0", proc)
        proc.send_signal(sig)  # to mpirun itself, as `kill -USR1 <mpirun pid>` does
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    docs = (ROOT / "docs" / "training.md").read_text()
    assert f"`kill -{sig.name[3:]} <mpirun pid>` → exit {status}" in docs
    if sig == signal.SIGUSR1:  # forwarded to both ranks: they agree at step 2 and rank 0 writes last.pt there
        assert checkpoint.load(out / "last.pt")["position"]["step"] == 2
