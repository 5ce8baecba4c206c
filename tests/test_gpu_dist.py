"""GPU paths of hpc_asr.dist.launch: NCCL (torch engine, backend "cpu:gloo,cuda:nccl") and Horovod on
CUDA. Skipped without CUDA; 2-rank cases need 2 GPUs (NCCL refuses two ranks on one GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, mpirun_cmd, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PROBE = str(ROOT / "tests" / "mpi_scripts" / "dist_gpu_probe.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def ranks() -> int:
    """2: one rank per GPU. With one GPU there is one rank, whose sum and weights agree with
    themselves by construction, so the test would prove nothing: skip, saying why."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs ({torch.cuda.device_count()} here): one rank agrees with itself by construction")
    return 2


def probes(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"gpu.{r}.json").read_text()) for r in range(n)]


def check(p: list[dict]) -> None:
    n = len(p)
    for r, x in enumerate(p):
        red = x["reduced"]
        assert red["cuda_f32"] == {"values": [n * (n + 1) / 2] * 3, "device": "cuda"}  # back on the caller's device
        assert red["cpu_f64"] == {"values": [1e300 * n * (n + 1) / 2], "device": "cpu"}
        assert red["cuda_f64"]["values"] == [pytest.approx(n / 3 + n * (n - 1) / 2, rel=1e-15)]
        assert red["cuda_bool"]["values"] == [n] and red["cpu_i64"]["values"] == [5 * n + n * (n - 1) // 2]
        assert x["opt_devices"] == [f"cuda:{r}"]  # each rank's own GPU, not rank 0's
    assert len({x["weight_sum"] for x in p}) == 1


def test_torch_engine_nccl(tmp_path):
    n = ranks()
    run([TORCHRUN, "--nproc_per_node", str(n), PROBE, "torch", str(tmp_path)], timeout=300)
    p = probes(tmp_path, n)
    assert p[0]["backend"] == "cpu:gloo,cuda:nccl"
    check(p)


def test_torch_engine_nccl_under_mpirun(tmp_path):
    n = ranks()
    run(mpirun_cmd(n, PROBE, "torch", str(tmp_path)), timeout=300)
    check(probes(tmp_path, n))


def test_horovod_on_gpu(tmp_path):
    import horovod.torch as hvd  # built by make setup-gpu: missing is a failure
    if not hvd.nccl_built():
        pytest.skip("Horovod built without NCCL (make setup-gpu builds it with HOROVOD_GPU_OPERATIONS=NCCL)")
    n = ranks()
    run(mpirun_cmd(n, PROBE, "horovod", str(tmp_path)), timeout=300)
    p = probes(tmp_path, n)
    assert p[0]["engine"] == "horovod"
    check(p)
