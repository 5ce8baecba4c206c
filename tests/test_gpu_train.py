"""GPU training paths: AMP fp16 (GradScaler) and bf16 steps, fused AdamW, torch.compile, and
GradScaler with Horovod's synchronize → unscale → clip → skip_synchronize order (one rank per GPU).
Skipped without CUDA (the CPU versions of the same paths run in test_train.py)."""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from conftest import mpirun_cmd, run
from helpers import tiny_yaml
from test_train import TINY_MODEL, _launch, config

import hpc_asr.train.loop as train_mod
from hpc_asr import checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
tiny_features = helpers.tiny_features


def _one_gpu_run(tiny_features, out, *extra):
    return train_mod.train(config(tiny_features["train"], tiny_features["dev"], out, *TINY_MODEL,
                                  "--data.max_utts", "2", "--train.max_steps", "4", "--train.log_every", "1",
                                  "--train.tensorboard", "false", *extra))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_amp_steps_on_cuda(tiny_features, tmp_path, precision):
    s = _one_gpu_run(tiny_features, tmp_path / precision, "--train.precision", precision)
    assert s["steps"] == 4 and all(r["finite"] for r in s["replicas"])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])
    scaler = checkpoint.load(tmp_path / precision / "last.pt")["scaler"]
    assert (scaler != {}) == (precision == "fp16")  # GradScaler only for fp16
    assert "device cuda" in (tmp_path / precision / "train.rank0.log").read_text()


def test_fused_adamw_matches_the_reference_step():
    from hpc_asr.config import Config
    from hpc_asr.train.setup import _build_optimizer

    model = torch.nn.Linear(64, 64).cuda()
    cfg = Config()
    fused = _build_optimizer(cfg, model, torch.device("cuda"))
    assert fused.defaults["fused"] is True
    ref_model = torch.nn.Linear(64, 64).cuda()
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW(ref_model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    x = torch.randn(8, 64, device="cuda")
    for m, opt in ((model, fused), (ref_model, ref)):
        m(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(model.weight, ref_model.weight, rtol=1e-5, atol=1e-6)


def test_compiled_model_trains(tiny_features, tmp_path):
    """torch.compile changes kernels, not the arithmetic: the losses follow an eager run's."""
    s = _one_gpu_run(tiny_features, tmp_path / "compiled", "--train.compile", "true", "--train.precision", "bf16")
    assert s["steps"] == 4 and all(r["finite"] for r in s["replicas"])
    eager = _one_gpu_run(tiny_features, tmp_path / "eager", "--train.compile", "false", "--train.precision", "bf16")
    losses = [h["loss"] for h in s["history"]]
    assert losses == pytest.approx([h["loss"] for h in eager["history"]], rel=2e-2)  # bf16 rounding, fused kernels


def test_horovod_gradscaler_order_and_inf_skip_on_gpus(tiny_features, tmp_path):
    """fp16 autocast + GradScaler through Horovod's synchronize/skip_synchronize on one rank per GPU
    (NCCL refuses two ranks on one GPU: 2 ranks where there are 2 GPUs, else 1): an inf at step 2
    on the last rank is skipped on every rank, the scale backs off, and the replicas stay identical.
    The demo's BatchNorm convolution module is on, so with 2 GPUs its statistics are averaged over
    NCCL at every checkpoint (the replicas would differ otherwise)."""
    import horovod.torch  # noqa: F401  (built by make setup-gpu: missing is a failure)
    if torch.cuda.device_count() < 2:  # one rank: "every rank" and "replicas identical" hold by construction
        pytest.skip(f"needs 2 GPUs ({torch.cuda.device_count()} here): one rank agrees with itself by construction")
    n = 2
    out = tmp_path / "hvd"
    cfg = tiny_yaml(tmp_path / "hvd.yaml", tiny_features["train"], tiny_features["dev"], out,
                    train={"epochs": 2, "precision": "fp16", "tensorboard": False}, model={"conv_norm": "batch"})
    proc = _launch(mpirun_cmd(n, "-m", "hpc_asr", "train", "--config", str(cfg), "--train.max_steps", "3"),
                   HPC_ASR_TEST_INF_STEP=f"2:{n - 1}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    s = json.loads((out / "train_summary.json").read_text())
    assert s["skipped_steps"] >= 1 and s["replicas_identical"], s["replicas"]  # fp16 may overflow early too
    scales = [r["scaler"]["scale"] for r in s["replicas"]]
    assert len(set(scales)) == 1 and scales[0] <= 2.0**15  # 65536 backed off at least once, alike on all ranks
    for r in range(n):
        assert "step 2: non-finite gradient norm, step skipped" in (out / f"train.rank{r}.log").read_text()
    run(mpirun_cmd(n, "-m", "hpc_asr", "train", "--config", str(cfg), "--train.max_steps", "4"), timeout=300)
    s = json.loads((out / "train_summary.json").read_text())
    assert s["replicas_identical"] and s["steps"] == 4
