"""Audio loading, Kaldi-compatible FBANK and CMVN statistics.

FBANK comes from kaldi-native-fbank (C++, the same algorithm as Kaldi's ``compute-fbank-feats``):
povey window, pre-emphasis 0.97, DC removal, ``snip_edges=True``, log mel energies. Samples are
scaled to the int16 range first, as Kaldi reads WAV files, so values match Kaldi's own tools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from hpc_asr.config import FeatureConfig

__all__ = ["AudioError", "CmvnStats", "fbank", "load_audio", "num_frames"]


class AudioError(ValueError):
    """An audio file cannot be used (unreadable, wrong rate, empty, too short)."""


def load_audio(path: str, sample_rate: int) -> np.ndarray:
    """Read a mono waveform as float32 in [-1, 1]; multi-channel audio keeps channel 0.

    Resampling is deliberately not done here: corpora are converted once at prep time, and a
    silent resample inside training would hide a wrong-rate corpus.
    """
    import soundfile as sf

    if not os.path.isfile(path):
        raise AudioError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError)
        raise AudioError(f"{path}: cannot decode audio ({e})") from None
    if sr != sample_rate:
        raise AudioError(f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz")
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no samples")
    return np.ascontiguousarray(data[:, 0])


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Frames Kaldi produces with snip_edges=True: 1 + (N - window) // shift, 0 if too short."""
    win = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    shift = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    return 0 if num_samples < win else 1 + (num_samples - win) // shift


def _options(cfg: FeatureConfig):
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = cfg.sample_rate
    opts.frame_opts.frame_length_ms = cfg.frame_length_ms
    opts.frame_opts.frame_shift_ms = cfg.frame_shift_ms
    opts.frame_opts.dither = cfg.dither
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = cfg.num_mel_bins
    opts.mel_opts.low_freq = cfg.low_freq
    opts.mel_opts.high_freq = cfg.high_freq
    return opts


def fbank(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Log-mel filterbank of a float waveform in [-1, 1].

    Returns (T, num_mel_bins) float32 with T = ``num_frames(len(samples), cfg)``.
    Raises AudioError when the waveform is shorter than one window.
    """
    import kaldi_native_fbank as knf

    if num_frames(len(samples), cfg) == 0:
        raise AudioError(f"{len(samples)} samples is shorter than one {cfg.frame_length_ms} ms window")
    comp = knf.OnlineFbank(_options(cfg))
    comp.accept_waveform(cfg.sample_rate, np.asarray(samples, np.float32) * 32768.0)
    comp.input_finished()
    n = comp.num_frames_ready
    out = np.empty((n, cfg.num_mel_bins), np.float32)
    for i in range(n):
        out[i] = comp.get_frame(i)
    return out


@dataclass
class CmvnStats:
    """Sums for global mean/variance normalisation; float64 so millions of frames add up exactly
    enough, and mergeable across MPI ranks by plain addition."""

    sum: np.ndarray
    sumsq: np.ndarray
    count: int = 0

    @classmethod
    def zeros(cls, dim: int) -> CmvnStats:
        return cls(np.zeros(dim, np.float64), np.zeros(dim, np.float64), 0)

    def add(self, feats: np.ndarray) -> None:
        f = feats.astype(np.float64)
        self.sum += f.sum(0)
        self.sumsq += (f * f).sum(0)
        self.count += f.shape[0]

    def mean_std(self, floor: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ValueError("CMVN over zero frames")
        mean = self.sum / self.count
        var = np.maximum(self.sumsq / self.count - mean * mean, floor)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)
