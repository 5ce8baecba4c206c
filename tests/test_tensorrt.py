"""TensorRT FP16 engine (hpc_asr.deploy.tensorrt). Without CUDA or tensorrt, ``export --tensorrt``
still succeeds, prints one skip line with the exact GPU-node command and records it; that command
refuses here with the same reason (exit 2). The gate's rule runs on the CPU with ONNX Runtime
standing in for the engine. The engine itself (build, gate, a corrupted input and a too-short
profile failing it, bench gpu's row) needs CUDA and tensorrt: `make gpu-check`."""

from __future__ import annotations

import json
import shlex
import shutil
import sys

import helpers
import numpy as np
import pytest
import torch
from conftest import run
from test_export import save_random_checkpoint

from hpc_asr.data.loader import FeatureSet
from hpc_asr.data.tokenizer import CharTokenizer
from hpc_asr.deploy import tensorrt

tiny_features = helpers.tiny_features
REASON = tensorrt.unavailable()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f"needs CUDA and tensorrt ({REASON})")


@pytest.fixture(scope="module")
def trt_export(tiny_features, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trt")
    ckpt, out = root / "tiny.pt", root / "export"
    save_random_checkpoint(ckpt, tiny_features["train"])
    proc = run([sys.executable, "-m", "hpc_asr", "export", "--checkpoint", str(ckpt),
                "--data", str(tiny_features["dev"]), "--out-dir", str(out), "--tensorrt"], timeout=300)
    return {"out": out, "data": tiny_features["dev"], "proc": proc}


def _ort(onnx_path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return lambda x, lens: sess.run(["log_probs", "out_lens"], {"feats": x, "feat_lens": lens})


def _noisy(run_fn):
    rng = np.random.default_rng(0)
    return lambda x, lens: run_fn((x + 3.0 * rng.standard_normal(x.shape)).astype(np.float32), lens)


@pytest.mark.skipif(REASON is None, reason="CUDA and tensorrt present: the engine is built (GPU tests below)")
def test_export_without_gpu_records_the_command_and_the_command_refuses(trt_export):
    out, proc = trt_export["out"], trt_export["proc"]
    cmd = tensorrt.build_command(out, trt_export["data"])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tensorrt:")]
    assert lines == [f"tensorrt: skipped ({REASON}); on a GPU node run: {cmd}"]
    res = json.loads((out / "export.json").read_text())
    assert res["parity_ok"] is True and res["tensorrt"] == {"skipped": REASON, "command": cmd}
    assert (out / "model.onnx").is_file() and not (out / tensorrt.PLAN).exists()
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "hpc_asr.deploy.tensorrt"]
    again = run([sys.executable, *argv[1:]], check=False)
    assert again.returncode == 2 and again.stdout.strip().splitlines() == [
        f"tensorrt: {REASON}; nothing built (run this command on a GPU node with tensorrt installed)"]
    assert not (out / tensorrt.PLAN).exists() and not (out / "tensorrt.json").exists()


def test_profile_covers_the_onnx_inputs(trt_export):
    inputs = tensorrt.onnx_inputs(trt_export["out"] / "model.onnx")
    assert inputs == {"feats": ["B", "T", 80], "feat_lens": ["B"]}
    assert tensorrt.profile_shapes(inputs, (1, 1, 8), (40, 300, 900)) == {
        "feats": [[1, 40, 80], [1, 300, 80], [8, 900, 80]], "feat_lens": [[1], [1], [8]]}


def test_gate_rule_on_cpu(trt_export):
    """The gate with ONNX Runtime as the engine passes; a corrupted input, wrong output lengths or
    an input outside the profile fail it, each with the numbers or the reason."""
    onnx_path, data, tok = trt_export["out"] / "model.onnx", FeatureSet(trt_export["data"]), CharTokenizer()
    ok = tensorrt.check_engine(_ort(onnx_path), onnx_path, data, tok, 1000, 3)  # 3: a partial last batch
    assert ok["parity_ok"] and ok["utterances"] == 4 and ok["max_abs_diff"] < 1e-4 and ok["frame_agreement"] == 1.0
    bad = tensorrt.check_engine(_noisy(_ort(onnx_path)), onnx_path, data, tok, 1000, 3)
    assert not bad["parity_ok"] and bad["transcript_agreement"] < 1.0 and bad["max_abs_diff"] > 0.1
    short = tensorrt.check_engine(lambda x, n: (_ort(onnx_path)(x, n)[0], n[:-1]), onnx_path, data, tok, 1000, 8)
    assert not short["parity_ok"] and "output lengths" in short["error"]

    def outside(x, lens):
        raise ValueError(f"feats {x.shape} is outside the engine's profile")

    refused = tensorrt.check_engine(outside, onnx_path, data, tok, 1000, 8)
    assert refused == {"utterances": 4, "parity_ok": False, "error": refused["error"]} and "profile" in refused["error"]


# ---- on a GPU node with tensorrt ---------------------------------------------------------------

@needs_trt
def test_export_builds_a_gated_engine(trt_export):
    out = trt_export["out"]
    res = json.loads((out / "export.json").read_text())["tensorrt"]
    assert res["parity_ok"] and res["transcript_agreement"] == 1.0 and res["utterances"] == 4
    assert res["gpu"] == torch.cuda.get_device_name(0) and res["precision"] == "fp16"
    assert res["profile"]["feats"][2][0] == 8 and 0 <= res["max_abs_diff"] < 0.5
    assert (out / tensorrt.PLAN).stat().st_size == res["bytes"]
    assert json.loads((out / "tensorrt.json").read_text())["tensorrt"] == res["tensorrt"]


@needs_trt
def test_engine_with_corrupted_input_fails_the_gate(trt_export):
    out, data = trt_export["out"], FeatureSet(trt_export["data"])
    engine = tensorrt.Engine((out / tensorrt.PLAN).read_bytes())
    good = tensorrt.check_engine(engine, out / "model.onnx", data, CharTokenizer(), 1000, 8)
    bad = tensorrt.check_engine(_noisy(engine), out / "model.onnx", data, CharTokenizer(), 1000, 8)
    assert good["parity_ok"] and not bad["parity_ok"] and bad["transcript_agreement"] < 1.0


@needs_trt
def test_too_short_profile_fails_and_writes_no_plan(trt_export, tmp_path):
    model_dir = tmp_path / "export"
    shutil.copytree(trt_export["out"], model_dir)
    for name in (tensorrt.PLAN, "tensorrt.json"):
        (model_dir / name).unlink()
    proc = run([sys.executable, "-m", "hpc_asr.deploy.tensorrt", "--model-dir", str(model_dir),
                "--data", str(trt_export["data"]), "--frames", "8,16,24"], check=False, timeout=300)
    assert proc.returncode == 1 and "parity failed" in proc.stderr
    res = json.loads((model_dir / "export.json").read_text())["tensorrt"]
    assert not res["parity_ok"] and "outside the engine's profile" in res["error"]
    assert not (model_dir / tensorrt.PLAN).exists()


@needs_trt
def test_bench_gpu_tensorrt_row(trt_export, tmp_path):
    out = tmp_path / "gpu.json"
    run([sys.executable, "-m", "hpc_asr", "bench", "gpu", "--only", "tensorrt", "--export-dir", str(trt_export["out"]),
         "--out", str(out)], timeout=300)
    rows = json.loads(out.read_text())["inference_3s"]["p50_ms"]
    assert rows["tensorrt_fp16"] > 0 and rows["eager_cuda"] > 0 and rows["torchscript_cuda"] > 0
