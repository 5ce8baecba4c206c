"""GPU benchmarks on one CUDA device: ``make bench-gpu`` → ``runs/bench/gpu.json``.

    python -m hpc_asr bench gpu --out runs/bench/gpu.json

Measured in one run on the device at hand (its name is recorded; numbers from another card are not
comparable):

- ``matmul_bf16_tflops``: an 8192³ bf16 matrix product, the reference the utilisation is quoted
  against (the card's practical tensor-core ceiling, not its datasheet peak).
- ``seed``: train steps of the seed preset (16 x 512 Conformer) at the preset's per-GPU batch
  (``data.max_frames`` in 15 s utterances) for fp32 (TF32 matmuls), bf16 and fp16 + GradScaler,
  and bf16 under ``torch.compile``: step time, audio seconds per second, model FLOP utilisation
  (FLOPs counted by torch.utils.flop_counter over the measured matmul ceiling), peak memory.
- ``speedup_vs_torchaudio_conformer``: the same interleaved comparison as ``make bench-train``
  (``hpc_asr.bench.train.comparison_models``) on the GPU, at the bench size and the seed size.
- ``fbank``: FBANK real-time factor of the torch backend on the GPU vs one CPU thread, and of
  ``torchaudio.compliance.kaldi`` where torchaudio imports, with the largest difference between them.
- ``inference_3s``: p50 latency of one 3 s utterance (batch 1, 300 frames; numpy features in, log-probs
  out, the copies included) through the TensorRT FP16 engine (hpc_asr.deploy.tensorrt), ONNX Runtime's
  CUDA provider (when onnxruntime-gpu is installed), and the PyTorch model on the GPU, eager and traced
  (TorchScript): the seed preset with random weights, or ``--export-dir``'s model.onnx (+ its checkpoint).
- ``predicted_speedup``: ``hpc_asr.bench.scaling`` fed the measured bf16 seed step instead of an assumed
  utilisation (a different card than the A100s of the model: the note says so).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[2]
UTT_SECONDS = 15.0  # LibriSpeech-like utterances


def _timed(step, steps: int, warmup: int) -> float:
    """Median seconds of ``step()`` on the GPU, each timed between synchronisations."""
    import torch

    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(n: int = 8192) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / _timed(lambda: a @ b, 10, 3) / 1e12


def _seed_setup():
    import torch

    from hpc_asr.cli import load_config
    from hpc_asr.config import ModelConfig
    from hpc_asr.model import ConformerCTC

    cfg = load_config(ROOT / "hpc_asr" / "configs" / "seed.yaml")
    model_cfg = ModelConfig(**{**vars(cfg.model), "vocab_size": cfg.train.bpe_vocab_size})
    frames = round(UTT_SECONDS * 100)
    utts = max(1, cfg.data.max_frames // frames)
    torch.manual_seed(0)
    model = ConformerCTC(model_cfg, cfg.features.num_mel_bins).cuda()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(utts, frames, cfg.features.num_mel_bins, generator=g).cuda()
    lens = torch.full((utts,), frames, device="cuda")
    targets = torch.randint(1, model_cfg.vocab_size, (utts, frames // 40), generator=g).cuda()
    return cfg, model_cfg, model, feats, lens, targets


def seed_steps(steps: int, warmup: int, compile_only: bool = False) -> dict:
    """The seed preset's train step on this GPU, per precision; the loop is hpc_asr.train's
    (autocast, fp32 CTC, GradScaler for fp16, clip, fused AdamW) without data loading."""
    import torch

    from hpc_asr.bench import scaling

    _, model_cfg, model, feats, lens, targets = _seed_setup()
    utts, frames = feats.shape[0], feats.shape[1]
    flops, params = scaling.step_flops(model_cfg, frames, utts)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = {"params": params, "per_gpu_batch": f"{utts} x {UTT_SECONDS:g} s", "flops_per_step": flops, "cases": {}}
    cases = ([("bf16_compiled", torch.bfloat16, True)] if compile_only else
             [("fp32", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)])
    for name, dtype, compiled in cases:
        net = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)

        def step(net=net, opt=opt, scaler=scaler, dtype=dtype):
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                lp, out_lens = net(feats, lens)
            loss = torch.nn.functional.ctc_loss(lp.float().transpose(0, 1), targets, out_lens,
                                                torch.full_like(lens, targets.shape[1]), zero_infinity=True)
            scaler.scale(loss / utts).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()  # first step: allocations, cuDNN autotuning, compilation
        first = time.perf_counter() - t0
        s = _timed(step, steps, warmup)
        out["cases"][name] = {"step_s": round(s, 5), "first_step_s": round(first, 2),
                              "audio_s_per_s": round(utts * UTT_SECONDS / s, 1),
                              "achieved_tflops": round(flops / s / 1e12, 1),
                              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return out


def torchaudio_on_gpu(steps: int, warmup: int) -> dict | None:
    try:
        import torchaudio  # noqa: F401
    except Exception as e:
        return {"skipped": f"torchaudio does not import: {e}"}
    from hpc_asr.bench.train import comparison_models, geomeans, interleaved_steps

    out = {}
    for label, d_model, layers, batch in (("bench_144x4", 144, 4, 16), ("seed_512x16", 512, 16, 16)):
        cases = {}
        for dtype in ("fp32", "bf16"):
            for secs in (3.0, 10.0):
                models = comparison_models(d_model, layers)
                cases[f"{dtype}_{secs:g}s"] = interleaved_steps(models, dtype, secs, batch, steps, warmup, "cuda")
        out[label] = {"batch": batch, "cases": cases, **geomeans(cases)}
    return out


def fbank_rates() -> dict:
    import numpy as np

    from hpc_asr.config import FeatureConfig
    from hpc_asr.data.features import available_backends, fbank

    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(60 * 16000)).astype(np.float32)  # 60 s of noise
    out: dict = {}

    def rate(backend: str, device: str) -> float:
        import torch

        cfg = FeatureConfig(backend=backend)
        fbank(wave, cfg, device)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fbank(wave, cfg, device)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return round(60 / best, 1)

    import torch

    torch.set_num_threads(1)
    out["torch_cpu_1_thread_xrt"] = rate("torch", "cpu")
    out["torch_cuda_xrt"] = rate("torch", "cuda")
    ref = fbank(wave, FeatureConfig(backend="torch"))
    out["max_abs_diff_cuda_vs_cpu"] = float(np.abs(fbank(wave, FeatureConfig(backend="torch"), "cuda") - ref).max())
    if "torchaudio" in available_backends():
        out["torchaudio_cpu_1_thread_xrt"] = rate("torchaudio", "cpu")
        ta = fbank(wave, FeatureConfig(backend="torchaudio"))
        out["max_abs_diff_torchaudio_vs_torch"] = float(np.abs(ta - ref).max())
    return out


def inference_3s(export_dir: str | None, steps: int, warmup: int) -> dict:
    """p50 ms of one 3 s utterance per runtime; a runtime that is not here is null with its reason."""
    import tempfile

    import numpy as np
    import torch

    from hpc_asr import checkpoint
    from hpc_asr.deploy import tensorrt
    from hpc_asr.deploy.export import export_onnx

    tmp = tempfile.TemporaryDirectory()
    if export_dir is None:  # timing only: the parity gates belong to an export
        cfg, _, model, *_ = _seed_setup()
        d, label = Path(tmp.name), "seed preset, random weights"
        export_onnx(model.cpu().eval(), d / "model.onnx", cfg.export.opset)
    else:
        d, label = Path(export_dir), str(export_dir)
        ckpt = json.loads((d / "export.json").read_text()).get("checkpoint", "")
        model = checkpoint.load_model(ckpt)[0] if ckpt and Path(ckpt).is_file() else None
    frames = tensorrt.OPT_FRAMES  # 3 s
    x = np.random.default_rng(0).standard_normal((1, frames, tensorrt.onnx_inputs(d / "model.onnx")["feats"][-1]))
    x, lens = x.astype(np.float32), np.array([frames], np.int64)

    def ms(step) -> float:
        return round(1000 * _timed(step, steps, warmup), 3)

    rows: dict = {"tensorrt_fp16": None, "onnxruntime_cuda": None, "eager_cuda": None, "torchscript_cuda": None}
    why: dict = {}
    if reason := tensorrt.unavailable():
        why["tensorrt_fp16"] = reason
    else:
        shapes = tensorrt.profile_shapes(tensorrt.onnx_inputs(d / "model.onnx"), (1, 1, 1), (frames,) * 3)
        engine = tensorrt.Engine(tensorrt.build_engine(d / "model.onnx", shapes))
        rows["tensorrt_fp16"] = ms(lambda: engine(x, lens))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CUDAExecutionProvider"])
        rows["onnxruntime_cuda"] = ms(lambda: sess.run(None, {"feats": x, "feat_lens": lens}))
    else:
        why["onnxruntime_cuda"] = "no CUDAExecutionProvider (onnxruntime-gpu not installed)"
    if model is None:
        why["eager_cuda"] = why["torchscript_cuda"] = "no checkpoint beside the export (export.json)"
    else:
        model = model.cuda().eval()
        traced = torch.jit.trace(model, (torch.from_numpy(x).cuda(), torch.from_numpy(lens).cuda()))
        for name, net in (("eager_cuda", model), ("torchscript_cuda", traced)):
            def step(net=net):
                with torch.no_grad():
                    return net(torch.from_numpy(x).cuda(), torch.from_numpy(lens).cuda())[0].cpu()
            rows[name] = ms(step)
    tmp.cleanup()
    return {"model": label, "utterance_s": frames / 100, "batch": 1, "p50_ms": rows, "not_measured": why}


def _utilisation(res: dict) -> None:
    peak = res.get("matmul_bf16_tflops")
    for case in res["seed"]["cases"].values():
        case["mfu_vs_matmul"] = round(case["achieved_tflops"] / peak, 3) if peak else None


def _device() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    info = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}
    try:
        import torchaudio

        info["torchaudio"] = torchaudio.__version__
    except Exception:
        info["torchaudio"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench/gpu.json")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="matmul,seed,torchaudio,fbank,compile,tensorrt",
                    help="comma-separated parts to run, in this order (compile: the seed step under torch.compile; "
                         "tensorrt: inference_3s, TensorRT FP16 vs ONNX Runtime CUDA vs PyTorch)")
    ap.add_argument("--export-dir", default=None,
                    help="tensorrt part: time this export's model.onnx (default: the seed preset, random weights)")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA device visible (torch.cuda.is_available() is False); nothing measured")
        return 2
    from hpc_asr.bench import scaling
    from hpc_asr.bench.micro import save_result

    parts = set(a.only.split(","))
    res: dict = {"device": _device()}
    t0 = time.time()
    if "matmul" in parts:
        res["matmul_bf16_tflops"] = round(matmul_tflops(), 1)
        save_result(a.out, res)  # after every part: a later part that fails or runs out of time loses nothing
    if "seed" in parts:
        res["seed"] = seed_steps(a.steps, a.warmup)
        _utilisation(res)
        bf16 = res["seed"]["cases"]["bf16"]["step_s"]
        pred = scaling.predict(res["seed"]["flops_per_step"], res["seed"]["params"], [8, 16, 32, 64, 128],
                               scaling.Cluster(), measured_step_s=bf16)
        res["predicted_speedup"] = {k: v["speedup"] for k, v in pred["fp16"].items()}
        res["predicted_note"] = (f"compute time = the bf16 seed step measured on {res['device']['name']} "
                                 "(not an A100); allreduce from the α-β ring model of hpc_asr.bench.scaling "
                                 "(assumed links)")
        save_result(a.out, res)
    if "torchaudio" in parts:
        res["torchaudio"] = torchaudio_on_gpu(a.steps, a.warmup)
        res["speedup_vs_torchaudio_conformer"] = {k: round(v["ratio_geomean"], 3) for k, v in res["torchaudio"].items()
                                                  if isinstance(v, dict) and "ratio_geomean" in v}
        save_result(a.out, res)
    if "fbank" in parts:
        res["fbank"] = fbank_rates()
        save_result(a.out, res)
    if "compile" in parts:
        res.setdefault("seed", {"cases": {}})["cases"].update(seed_steps(a.steps, a.warmup, compile_only=True)["cases"])
        _utilisation(res)
        save_result(a.out, res)
    if "tensorrt" in parts:
        res["inference_3s"] = inference_3s(a.export_dir, max(a.steps, 20), a.warmup)
    res["wall_s"] = round(time.time() - t0, 1)
    save_result(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
