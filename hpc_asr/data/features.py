"""Audio loading, Kaldi-compatible FBANK and CMVN statistics.

FBANK follows Kaldi's ``compute-fbank-feats``: povey window, pre-emphasis 0.97, DC removal,
``snip_edges=True``, power spectrum, triangular mel banks, log floored at float32 epsilon.
Samples are scaled to the int16 range first, as Kaldi reads WAV files, so values match Kaldi's
own tools. Backends (``features.backend``), all checked against each other in the tests:

- ``torch`` (default): the whole utterance at once — frames by ``unfold``, one ``rfft``, the mel
  banks as one matmul; on CPU or, at prep, on a GPU (``device``).
- ``kaldi_native``: kaldi-native-fbank (C++), frame by frame.
- ``torchaudio``: ``torchaudio.compliance.kaldi.fbank``, where torchaudio is installed.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from hpc_asr.config import FeatureConfig

__all__ = ["BACKENDS", "AudioError", "CmvnStats", "available_backends", "fbank", "load_audio", "num_frames"]

BACKENDS = ("torch", "kaldi_native", "torchaudio")
MIN_SOURCE_RATE = 4000  # below this a "sample rate" is a broken header, not audio worth resampling
_FLOAT_EPS = float(np.finfo(np.float32).eps)  # Kaldi's log floor
_INTEGER_SUBTYPES = ("PCM_", "ALAW", "ULAW", "DPCM_", "DWVW_")  # integer samples: cannot hold NaN or Inf


class AudioError(ValueError):
    """An audio file cannot be used (unreadable, wrong rate, empty, too short, NaN)."""


def load_audio(path: str, sample_rate: int, convert: bool = False) -> np.ndarray:
    """Read a mono waveform as float32 in [-1, 1].

    Without ``convert`` (training, latency) a wrong rate is an error and multi-channel audio
    keeps channel 0: a silent resample there would hide a wrong-rate corpus. With ``convert``
    (prep only) channels are averaged and other rates resampled with soxr.
    """
    if not os.path.isfile(path):
        raise AudioError(f"{path}: audio file not found")
    flac = _read_flac(path) if path.lower().endswith(".flac") else None
    data, sr, integer = flac if flac is not None else _read_soundfile(path)
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no samples")
    if not integer and not np.isfinite(data).all():
        raise AudioError(f"{path}: NaN or Inf samples")
    if not convert:
        if sr != sample_rate:
            raise AudioError(f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz")
        return np.ascontiguousarray(data[:, 0])
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        mono = resample(mono, sr, sample_rate, path)
    return np.ascontiguousarray(mono, np.float32)


def _read_soundfile(path: str) -> tuple[np.ndarray, int, bool]:
    """(samples (N, channels) float32, rate, integer samples?) through libsndfile."""
    import soundfile as sf

    try:
        with sf.SoundFile(path) as f:
            data, sr, subtype = f.read(dtype="float32", always_2d=True), f.samplerate, f.subtype
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError)
        raise AudioError(f"{path}: cannot decode audio ({str(e).splitlines()[0]})") from None
    return data, sr, subtype.startswith(_INTEGER_SUBTYPES)


def _read_flac(path: str) -> tuple[np.ndarray, int, bool] | None:
    """FLAC through dr_flac (miniaudio): ~1.5-1.9x faster than libsndfile here and sample for sample
    the same. dr_flac decodes a cut-off stream silently, so the decoded length must equal the
    length the stream header states. A stream that states none (0, written by a streaming encoder;
    libsndfile cannot read those at all) is decoded as far as it goes. None where miniaudio is
    not installed: libsndfile then reads FLAC too."""
    try:
        import miniaudio
    except ImportError:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read()
        total = miniaudio.flac_get_info(raw).num_frames
        dec = miniaudio.flac_read_f32(raw)
    except miniaudio.MiniaudioError as e:
        raise AudioError(f"{path}: cannot decode audio ({e})") from None
    if total and dec.num_frames != total:
        raise AudioError(f"{path}: cannot decode audio (truncated or corrupt FLAC stream: "
                         f"{dec.num_frames} of {total} samples)")
    data = np.frombuffer(dec.samples, np.float32).reshape(-1, dec.nchannels)
    return data, dec.sample_rate, True


def resample(x: np.ndarray, src: float, dst: float, name: str = "audio") -> np.ndarray:
    """soxr (high quality) resampling; a rate soxr cannot take raises AudioError."""
    import soxr

    if src < MIN_SOURCE_RATE:
        raise AudioError(f"{name}: sample rate {src} Hz cannot be resampled to {dst} Hz (< {MIN_SOURCE_RATE})")
    try:
        return soxr.resample(x, src, dst, quality="HQ").astype(np.float32, copy=False)
    except (ValueError, RuntimeError) as e:
        raise AudioError(f"{name}: cannot resample {src} -> {dst} Hz ({e})") from None


def num_frames(num_samples: int, cfg: FeatureConfig) -> int:
    """Frames Kaldi produces with snip_edges=True: 1 + (N - window) // shift, 0 if too short."""
    win = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    shift = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    return 0 if num_samples < win else 1 + (num_samples - win) // shift


def available_backends() -> list[str]:
    """Backends that import here (torchaudio often does not load beside a newer torch)."""
    out = ["torch"]
    for name, module in (("kaldi_native", "kaldi_native_fbank"), ("torchaudio", "torchaudio.compliance.kaldi")):
        try:
            __import__(module)
            out.append(name)
        except Exception:  # torchaudio fails with OSError/RuntimeError on an ABI mismatch
            pass
    return out


def fbank(samples: np.ndarray, cfg: FeatureConfig, device: str = "cpu") -> np.ndarray:
    """Log-mel filterbank of a float waveform in [-1, 1] with ``cfg.backend``.

    Returns (T, num_mel_bins) float32 with T = ``num_frames(len(samples), cfg)``.
    Raises AudioError when the waveform is shorter than one window.
    """
    if num_frames(len(samples), cfg) == 0:
        raise AudioError(f"{len(samples)} samples is shorter than one {cfg.frame_length_ms} ms window")
    x = np.asarray(samples, np.float32)
    if cfg.backend == "kaldi_native":
        return _fbank_kaldi_native(x * 32768.0, cfg)
    if cfg.backend == "torchaudio":
        return _fbank_torchaudio(x * 32768.0, cfg)
    return _fbank_torch(x, cfg, device)


def _fbank_kaldi_native(x: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
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
    comp = knf.OnlineFbank(opts)
    comp.accept_waveform(cfg.sample_rate, x)
    comp.input_finished()
    n = comp.num_frames_ready
    out = np.empty((n, cfg.num_mel_bins), np.float32)
    for i in range(n):
        out[i] = comp.get_frame(i)
    return out


def _fbank_torchaudio(x: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    import torch
    from torchaudio.compliance.kaldi import fbank as ta_fbank

    return ta_fbank(torch.from_numpy(x)[None], sample_frequency=cfg.sample_rate,
                    frame_length=cfg.frame_length_ms, frame_shift=cfg.frame_shift_ms, dither=cfg.dither,
                    num_mel_bins=cfg.num_mel_bins, low_freq=cfg.low_freq, high_freq=cfg.high_freq,
                    snip_edges=True, window_type="povey", preemphasis_coefficient=0.97).numpy()


def _sizes(cfg: FeatureConfig) -> tuple[int, int, int]:
    win = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    shift = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    return win, shift, 1 << (win - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _tables(sample_rate: int, win: int, nfft: int, bins: int, low: float, high: float, device: str,
            scale: float = 1.0):
    """Povey window (win,) and Kaldi mel banks over the FFT bins below Nyquist (nfft // 2, bins):
    Kaldi gives the Nyquist bin weight 0, so it is left out. The window is multiplied by ``scale``
    (32768 applies Kaldi's int16 sample scale in the same multiply, exactly: a power of two).
    Cached per settings."""
    import torch

    n = torch.arange(win, dtype=torch.float64)
    window = (0.5 - 0.5 * torch.cos(2 * math.pi * n / (win - 1))) ** 0.85
    nyquist = sample_rate / 2
    high = high if high > 0 else nyquist + high

    def mel(f):
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    lo_mel, hi_mel = mel(low), mel(high)
    delta = (hi_mel - lo_mel) / (bins + 1)
    left = lo_mel + torch.arange(bins, dtype=torch.float64)[:, None] * delta  # (bins, 1)
    center, right = left + delta, left + 2 * delta
    fft_mel = mel(torch.arange(nfft // 2, dtype=torch.float64) * sample_rate / nfft)[None, :]  # (1, nfft/2)
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0).T  # (nfft/2, bins)
    return (window * scale).float().to(device), banks.contiguous().float().to(device)


def _fbank_torch(x: np.ndarray, cfg: FeatureConfig, device: str = "cpu") -> np.ndarray:
    """``x`` in [-1, 1]: without dither the int16 scale rides on the window (exact), with dither
    the samples are scaled first (dither is in int16 units)."""
    import torch

    win, shift, nfft = _sizes(cfg)
    scale = 1.0 if cfg.dither > 0 else 32768.0
    window, banks = _tables(cfg.sample_rate, win, nfft, cfg.num_mel_bins, cfg.low_freq, cfg.high_freq, device, scale)
    with torch.no_grad():
        sig = torch.from_numpy(x).to(device)  # (N,)
        if cfg.dither > 0:
            sig = sig * 32768.0
        buf = torch.empty(1 + (len(sig) - win) // shift, nfft, device=device)  # (T, nfft): the FFT input
        buf[:, win:] = 0  # zero padding
        if cfg.dither > 0:
            _frames_dithered(buf[:, :win], sig, window, shift, cfg.dither)
        else:
            _frames(buf[:, :win], sig, window, shift)
        sq = torch.view_as_real(torch.fft.rfft(buf)).flatten(1).square_()  # (T, 2 (nfft/2 + 1)): re², im², ...
        half = nfft // 2  # bins 0 .. nfft/2 - 1; the Nyquist bin has no mel weight
        power = torch.add(sq[:, 0:2 * half:2], sq[:, 1:2 * half:2])  # |X|² (T, nfft/2)
        mel = torch.matmul(power, banks).clamp_min_(_FLOAT_EPS).log_()  # (T, bins)
        return mel.cpu().numpy()


def _frames(v, sig, window, shift: int) -> None:
    """Kaldi's DC removal, pre-emphasis 0.97 and povey window into v (T, win), computed on the
    signal once rather than on every (2.5x overlapping) frame. Per frame with mean m, Kaldi's
    p[0] = 0.03 (x[0] - m) and p[i] = (x[i] - m) - 0.97 (x[i-1] - m) = e[i] - 0.03 m, where
    e = x[n] - 0.97 x[n-1] over the whole signal; p[0] is multiplied by the povey window's 0."""
    import torch

    win = v.shape[1]
    mean = sig.unfold(0, win, shift).mean(dim=1)  # (T,)
    e = torch.empty_like(sig)
    e[0] = 0
    torch.sub(sig[1:], sig[:-1], alpha=0.97, out=e[1:])  # pre-emphasis of the whole signal
    torch.mul(e.unfold(0, win, shift), window, out=v)  # (T, win): e framed and windowed
    v.addr_(mean, window, alpha=-0.03)  # minus 0.03 m w, the DC term after pre-emphasis


def _frames_dithered(v, sig, window, shift: int, dither: float) -> None:
    """Kaldi's per-frame steps with dither (fresh noise in every frame, as Kaldi draws it)."""
    import torch

    v.copy_(sig.unfold(0, v.shape[1], shift))
    v += dither * torch.randn_like(v)
    v -= v.mean(dim=1, keepdim=True)  # DC removal
    v[:, 1:] -= 0.97 * v[:, :-1]  # pre-emphasis (the right side is evaluated first, from the old v)
    v[:, 0] *= 1 - 0.97  # Kaldi's first sample: x[0] -= 0.97 x[0]
    v *= window  # povey


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
        self.sum += feats.sum(0, dtype=np.float64)  # float64 accumulation without a float64 copy
        self.sumsq += np.square(feats).sum(0, dtype=np.float64)
        self.count += feats.shape[0]

    def mean_std(self, floor: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
        """Global mean and std (float32); the variance is floored at ``floor`` so a constant bin
        (silence padding, a band-limited corpus) cannot divide by zero. Prep's index.json uses it."""
        if self.count == 0:
            raise ValueError("CMVN over zero frames")
        mean = self.sum / self.count
        var = np.maximum(self.sumsq / self.count - mean * mean, floor)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)
