"""``make bench-gpu`` on a CUDA machine: the JSON names the card and holds sane measurements.
Skipped without CUDA; without a GPU the command says so in one line and exits 2."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import run


def test_bench_gpu_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run([sys.executable, "-m", "hpc_asr", "bench", "gpu", "--out", str(tmp_path / "gpu.json")], check=False)
    assert proc.returncode == 2 and proc.stdout.strip().splitlines() == [
        "bench-gpu: no CUDA device visible (torch.cuda.is_available() is False); nothing measured"]
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_gpu_matmul_and_fbank(tmp_path):
    out = tmp_path / "gpu.json"
    run([sys.executable, "-m", "hpc_asr", "bench", "gpu", "--only", "matmul,fbank", "--out", str(out)], timeout=300)
    res = json.loads(out.read_text())
    assert res["device"]["name"] == torch.cuda.get_device_name(0)
    assert 10 < res["matmul_bf16_tflops"] < 5000  # any real GPU; a broken timer gives 0 or inf
    assert res["fbank"]["torch_cuda_xrt"] > 0 and res["fbank"]["max_abs_diff_cuda_vs_cpu"] < 2e-3
