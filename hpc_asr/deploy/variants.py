"""Export variants of ``model.onnx``: int8 weights (ONNX Runtime dynamic quantization) and the
FBANK front end inside the graph (waveform in), each checked against what it replaces.

- ``model.int8.onnx`` (and ``streaming.int8.onnx``): MatMul weights in int8, activations
  quantized per call (``onnxruntime.quantization.quantize_dynamic``); checked against the fp32
  graph on the parity utterances (max |Δ log-prob|, greedy transcript agreement).
- ``model.wave.onnx``: ``waveform (B, N) float32 in [-1, 1], wave_lens (B,)`` → ``log_probs,
  out_lens``. Kaldi FBANK as graph ops — per-frame DC removal, pre-emphasis 0.97, povey window,
  the DFT as two matmuls (cos, sin), power, mel banks, log — with hpc_asr.data.features' window and
  banks, so a client cannot drift from the training features; checked against
  ``features.fbank`` + ``model.onnx`` on deterministic test signals. Needs ``features.dither: 0``.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hpc_asr.config import FeatureConfig
from hpc_asr.data.features import _FLOAT_EPS, _sizes, _tables, fbank
from hpc_asr.model import ConformerCTC

__all__ = ["WAVE_INPUTS", "FbankGraph", "check_wave", "export_wave_onnx", "gate_signals", "int8_agreement",
           "quantize_int8"]

WAVE_INPUTS = ["waveform", "wave_lens"]


class FbankGraph(nn.Module):
    """Kaldi FBANK (snip_edges, no dither) of a padded batch: waveform (B, N), lens (B,) →
    (feats (B, T, F), frames (B,)), T = 1 + (N - window) // shift. Traceable: no FFT op needed."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        if cfg.dither != 0:
            raise ValueError(f"features.dither={cfg.dither}: the FBANK graph is deterministic, it needs dither 0")
        self.win, self.shift, nfft = _sizes(cfg)
        window, banks = _tables(cfg.sample_rate, self.win, nfft, cfg.num_mel_bins, cfg.low_freq, cfg.high_freq,
                                "cpu", 32768.0)  # Kaldi's int16 sample scale rides on the window
        k = torch.arange(nfft // 2, dtype=torch.float64)[None, :]  # bins below Nyquist (it has no mel weight)
        n = torch.arange(self.win, dtype=torch.float64)[:, None]  # zero padding to nfft adds nothing
        ang = 2 * math.pi * n * k / nfft
        self.register_buffer("window", window)
        self.register_buffer("cos", torch.cos(ang).float())  # (win, nfft/2)
        self.register_buffer("sin", torch.sin(ang).float())
        self.register_buffer("banks", banks)  # (nfft/2, F)

    def forward(self, wave: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.div(wave.shape[1] - self.win, self.shift, rounding_mode="floor") + 1
        idx = torch.arange(t)[:, None] * self.shift + torch.arange(self.win)[None, :]  # (T, win)
        x = wave[:, idx]  # (B, T, win)
        x = x - x.mean(dim=-1, keepdim=True)  # DC removal per frame
        x = torch.cat([x[..., :1] * 0.03, x[..., 1:] - 0.97 * x[..., :-1]], dim=-1)  # pre-emphasis per frame
        x = x * self.window
        power = (x @ self.cos).square() + (x @ self.sin).square()  # |X_k|², (B, T, nfft/2)
        feats = (power @ self.banks).clamp_min(_FLOAT_EPS).log()
        frames = torch.div(lens - self.win, self.shift, rounding_mode="floor") + 1
        return feats, frames.clamp_min(0)


class _WaveGraph(nn.Module):
    def __init__(self, model: ConformerCTC, features: FeatureConfig):
        super().__init__()
        self.fbank, self.model = FbankGraph(features), model

    def forward(self, wave: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(*self.fbank(wave, lens))


def gate_signals(cfg: FeatureConfig, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Deterministic speech-like test audio (harmonic chirps in noise, 0.5-2.3 s) for the gates."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(int(cfg.sample_rate * (0.5 + 0.6 * i))) / cfg.sample_rate
        f0 = 120 + 80 * np.sin(2 * np.pi * 1.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / cfg.sample_rate
        x = sum(np.sin(h * phase) / h for h in range(1, 8)) * (0.1 + 0.1 * np.sin(2 * np.pi * 3 * t) ** 2)
        out.append((x + 0.003 * rng.standard_normal(len(t))).astype(np.float32))
    return out


def export_wave_onnx(model: ConformerCTC, features: FeatureConfig, path: Path, opset: int) -> None:
    import onnx

    graph = _WaveGraph(model, features).eval()
    example = (torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=opset,
                          input_names=WAVE_INPUTS, output_names=["log_probs", "out_lens"],
                          dynamic_axes={"waveform": {0: "B", 1: "N"}, "wave_lens": {0: "B"},
                                        "log_probs": {0: "B", 1: "T_out"}, "out_lens": {0: "B"}})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_wave(wave_path: Path, onnx_path: Path, features: FeatureConfig, tok) -> dict:
    """The waveform graph against prep's FBANK (``features.fbank``) + ``model.onnx``, one test
    signal at a time and as one padded batch."""
    import onnxruntime as ort

    from hpc_asr.decode.ctc import greedy_ids

    wave_s = ort.InferenceSession(str(wave_path), providers=["CPUExecutionProvider"])
    feat_s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    sigs = gate_signals(features)
    lens = np.array([len(s) for s in sigs], np.int64)
    batch = np.zeros((len(sigs), lens.max()), np.float32)
    for i, s in enumerate(sigs):
        batch[i, : len(s)] = s
    b_lp, b_len = wave_s.run(None, {"waveform": batch, "wave_lens": lens})
    diff, same = 0.0, True
    for i, s in enumerate(sigs):
        f = fbank(s, features)
        ref, ref_len = feat_s.run(None, {"feats": f[None], "feat_lens": np.array([len(f)], np.int64)})
        one, one_len = wave_s.run(None, {"waveform": s[None], "wave_lens": lens[i: i + 1]})
        n = int(ref_len[0])
        if int(one_len[0]) != n or int(b_len[i]) != n:
            raise RuntimeError(f"waveform graph: {int(one_len[0])} frames for test signal {i}, model.onnx {n}")
        diff = max(diff, float(np.abs(one[0, :n] - ref[0, :n]).max()), float(np.abs(b_lp[i, :n] - ref[0, :n]).max()))
        text = tok.decode(greedy_ids(ref[0], n, tok.blank))
        same = same and text == tok.decode(greedy_ids(one[0], n, tok.blank)) == tok.decode(
            greedy_ids(b_lp[i], n, tok.blank))
    return {"signals": len(sigs), "max_abs_diff": diff, "transcripts_match": same}


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the MatMul/Gemm weights (activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is for static quantization
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)


def int8_agreement(pairs: list[tuple[np.ndarray, np.ndarray]], tok) -> dict:
    """int8 against fp32 over (int8, fp32) log-probs of the same utterances' valid frames (T, V):
    max |Δ posterior|, the share of frames whose best label agrees and of greedy transcripts that
    agree. Quantization is meant to move the numbers; its WER cost is measured, not gated."""
    from hpc_asr.decode.ctc import greedy_ids

    diff, same, frames, agree = 0.0, 0, 0, 0
    for q, f in pairs:
        if len(f):
            diff = max(diff, float(np.abs(np.exp(q) - np.exp(f)).max()))
        same += int((q.argmax(-1) == f.argmax(-1)).sum())
        frames += len(f)
        agree += greedy_ids(q, len(q), tok.blank) == greedy_ids(f, len(f), tok.blank)
    return {"utterances": len(pairs), "max_abs_posterior_diff": diff, "frame_agreement": same / max(frames, 1),
            "transcript_agreement": agree / max(len(pairs), 1)}
