"""Benchmarks, each against a peer measured in the same run (ratios survive noisy machines).

    python -m hpc_asr bench micro --out runs/bench/bench.json [--seconds 60]

- fbank: our FBANK (kaldi-native-fbank) vs lhotse's torch Kaldi FBANK, audio seconds per second.
- model: Conformer-CTC inference, ONNX Runtime vs PyTorch eager, same input, one thread.
- train_step: forward+backward throughput of the demo model, conv1d vs conv2d front end.
- vs_pocketsphinx: waveform → text on the real LibriSpeech fixture, one thread: our pipeline
  (FBANK + the demo-size model in ONNX Runtime + greedy CTC) vs PocketSphinx (``hpc_asr.bench.peer``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hpc_asr.atomic import write_json_atomic
from hpc_asr.cli import load_config
from hpc_asr.config import FeatureConfig, ModelConfig
from hpc_asr.data.features import fbank
from hpc_asr.model import ConformerCTC


def best_time(fn, min_time: float = 1.0) -> float:
    """Best wall seconds of ``fn()`` over runs repeated for ``min_time`` after a warm-up; every
    benchmark of the package times this way."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_time:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return best


def _rate(fn, work_s: float, min_time: float = 1.0) -> float:
    """Work seconds processed per wall second."""
    return work_s / best_time(fn, min_time)


def bench_fbank(seconds: float) -> dict:
    from lhotse.features.kaldi.layers import Wav2LogFilterBank

    cfg = FeatureConfig()
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * cfg.sample_rate)) / cfg.sample_rate
    wave = (0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    peer = Wav2LogFilterBank(sampling_rate=cfg.sample_rate, num_filters=80, snip_edges=True, dither=0.0,
                             low_freq=20.0, high_freq=0.0)
    x = torch.from_numpy(wave * 32768.0)[None]
    ours = _rate(lambda: fbank(wave, cfg), seconds)
    with torch.no_grad():
        theirs = _rate(lambda: peer(x), seconds)
    return {"audio_s": seconds, "ours_x_realtime": round(ours, 1), "lhotse_x_realtime": round(theirs, 1),
            "ratio_ours_over_lhotse": round(ours / theirs, 3)}


def bench_model(model_cfg: ModelConfig, frames: int) -> dict:
    import onnxruntime as ort

    from hpc_asr.deploy.export import export_onnx

    model_cfg.vocab_size = 29
    model = ConformerCTC(model_cfg).eval()
    x, lens = torch.randn(1, frames, 80), torch.tensor([frames])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        export_onnx(model, path, 17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {"feats": x.numpy(), "feat_lens": lens.numpy()}
        onnx_rate = _rate(lambda: sess.run(None, feeds), frames / 100)
    with torch.no_grad():
        torch_rate = _rate(lambda: model(x, lens), frames / 100)
    return {"utterance_s": frames / 100, "onnxruntime_x_realtime": round(onnx_rate, 1),
            "pytorch_x_realtime": round(torch_rate, 1), "ratio_onnx_over_pytorch": round(onnx_rate / torch_rate, 3)}


def bench_train_step(model_cfg: ModelConfig, batch: int, frames: int) -> dict:
    out = {}
    for sub in ("conv1d", "conv2d"):
        cfg = ModelConfig(**{**model_cfg.__dict__, "subsampling": sub, "vocab_size": 29,
                             "subsample_factor": model_cfg.subsample_factor if sub == "conv1d" else 4})
        model = ConformerCTC(cfg)
        x, lens = torch.randn(batch, frames, 80), torch.full((batch,), frames)

        def step(model=model, x=x, lens=lens):
            lp, _ = model(x, lens)
            lp.sum().backward()

        out[f"{sub}_x_realtime"] = round(_rate(step, batch * frames / 100, 2.0), 1)
    out["ratio_conv1d_over_conv2d"] = round(out["conv1d_x_realtime"] / out["conv2d_x_realtime"], 3)
    return out


def bench_vs_pocketsphinx(model_cfg: ModelConfig, fixtures: Path) -> dict:
    """Real-time factor of the whole recognizer on the same waveforms; speed only (the weights
    are random: accuracy is the demo report's business)."""
    import onnxruntime as ort

    from hpc_asr.bench import peer
    from hpc_asr.data.features import load_audio
    from hpc_asr.deploy.export import export_onnx

    waves = [load_audio(str(f), 16000) for f in sorted(fixtures.glob("LibriSpeech/*/*/*/*.flac"))]
    if not waves:
        return {"skipped": f"no LibriSpeech fixture under {fixtures}"}
    audio_s = sum(len(w) for w in waves) / 16000
    model_cfg.vocab_size = 29
    model = ConformerCTC(model_cfg).eval()
    cfg = FeatureConfig()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.onnx"
        export_onnx(model, path, 17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def ours():
            for w in waves:
                f = fbank(w, cfg)[None]
                lp = sess.run(None, {"feats": f, "feat_lens": np.array([f.shape[1]])})[0]
                lp[0].argmax(-1)

        ours_rate = _rate(ours, audio_s)
    decoder = peer._decoder()
    peer_rate = _rate(lambda: [peer.decode(decoder, w) for w in waves], audio_s)
    return {"audio_s": round(audio_s, 2), "utterances": len(waves), "ours_rtf": round(1 / ours_rate, 6),
            "pocketsphinx_rtf": round(1 / peer_rate, 6), "speedup_vs_pocketsphinx": round(ours_rate / peer_rate, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/bench.json")
    p.add_argument("--config", default="hpc_asr/configs/demo.yaml")
    p.add_argument("--seconds", type=float, default=60.0, help="audio length for the FBANK benchmark")
    p.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[3] / "shared" / "fixtures"),
                   help="folder holding LibriSpeech/ (the real utterances of the speed comparison)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core per rank, as in training and serving
    model_cfg = load_config(args.config).model
    res = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": 1},
        "fbank": bench_fbank(args.seconds),
        "model_inference": bench_model(model_cfg, 400),
        "train_step": bench_train_step(model_cfg, 8, 400),
        "vs_pocketsphinx": bench_vs_pocketsphinx(load_config(args.config).model, Path(args.fixtures)),
    }
    save_result(args.out, res)
    return 0


def save_result(out: str | Path, res: dict) -> None:
    """Every benchmark's JSON under runs/bench/, written and echoed the same way."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
