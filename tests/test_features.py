"""FBANK framing and parity with an independent Kaldi-compatible implementation (lhotse), audio
loading errors, and CMVN statistics."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf

from hpc_asr.config import ConfigError, FeatureConfig
from hpc_asr.data.features import AudioError, CmvnStats, available_backends, fbank, load_audio, num_frames

CFG = FeatureConfig()
SR = CFG.sample_rate
INT16_LOG_POWER = 2 * math.log(32768.0)  # log-mel offset between int16-scaled and [-1, 1] input


@pytest.fixture(scope="module")
def speech(librispeech_dir) -> np.ndarray:
    return load_audio(str(librispeech_dir / "test-clean/1089/134686/1089-134686-0001.flac"), SR)


def chirp(seconds: float = 1.5) -> np.ndarray:
    """100 Hz -> 7 kHz sweep plus seeded noise at -60 dB: every mel bin carries energy, as in a
    recording, instead of the float32 rounding noise a pure tone leaves in far-away bins."""
    t = np.arange(int(seconds * SR)) / SR
    f0, f1 = 100.0, 7000.0
    x = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1])))
    return (x + 1e-3 * np.random.default_rng(0).standard_normal(len(t))).astype(np.float32)


def lhotse_fbank(samples: np.ndarray) -> np.ndarray:
    """Kaldi's defaults as lhotse spells them. lhotse feeds its input to the FFT unscaled (its audio
    loaders return [-1, 1]), and its default high_freq=-400 is not Kaldi's: high_freq <= 0 means
    Nyquist + high_freq in both, so Kaldi's default 0 must be passed explicitly."""
    import torch

    try:
        from lhotse.features.kaldi.layers import Wav2LogFilterBank
    except ImportError as e:  # lhotse>=1.30 imports urllib3 without declaring it
        pytest.fail(f"lhotse is needed for the FBANK parity test and failed to import: {e}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lhotse warns that snip_edges=True is unusual for lhotse
        layer = Wav2LogFilterBank(
            sampling_rate=SR, frame_length=CFG.frame_length_ms / 1000, frame_shift=CFG.frame_shift_ms / 1000,
            round_to_power_of_two=True, remove_dc_offset=True, preemph_coeff=0.97, window_type="povey",
            dither=0.0, snip_edges=True, low_freq=CFG.low_freq, high_freq=0.0, num_filters=CFG.num_mel_bins,
            use_energy=False,
        ).eval()
    with torch.no_grad():
        return layer(torch.from_numpy(np.asarray(samples, np.float32))[None])[0].numpy()


INSTALLED = available_backends()


def backend_cfg(backend: str) -> FeatureConfig:
    if backend not in INSTALLED:
        pytest.skip(f"features.backend {backend}: does not import here (torchaudio does not load beside "
                    f"this torch; the GPU set-up installs a matching pair)")
    return FeatureConfig(backend=backend)


@pytest.mark.parametrize("backend", ["torch", "kaldi_native", "torchaudio"])
@pytest.mark.parametrize(("samples", "frames"), [(400, 1), (559, 1), (560, 2), (16000, 98), (16079, 98), (16080, 99)])
def test_frame_count_snip_edges(samples, frames, backend):
    cfg = backend_cfg(backend)
    x = np.random.default_rng(samples).uniform(-0.5, 0.5, samples).astype(np.float32)
    assert num_frames(samples, cfg) == frames
    feats = fbank(x, cfg)
    assert feats.shape == (frames, 80) and feats.dtype == np.float32
    assert np.isfinite(feats).all()


def test_shorter_than_one_window_is_an_error():
    assert num_frames(399, CFG) == 0
    with pytest.raises(AudioError, match="399 samples"):
        fbank(np.zeros(399, np.float32), CFG)


@pytest.mark.parametrize("backend", ["torch", "kaldi_native", "torchaudio"])
@pytest.mark.parametrize("signal", ["speech", "chirp"])
def test_matches_lhotse_kaldi_fbank(signal, speech, backend):
    x = speech if signal == "speech" else chirp()
    ours = fbank(x, backend_cfg(backend))
    ref = lhotse_fbank(x * 32768.0)  # like with like: ours scales [-1, 1] to int16 as Kaldi reads WAV
    assert ref.shape == ours.shape
    diff = np.abs(ours.astype(np.float64) - ref)
    # Both run in float32, so a bin ~15 nats (65 dB) below its frame's peak is at the FFT's rounding
    # noise and may differ by a lot; above that, measured max ~2.5e-4 (mean ~3e-5), so 1e-3 still
    # catches any change of window, pre-emphasis, mel edges or scale, all of which shift bins by >1e-2.
    strong = ours > ours.max(axis=1, keepdims=True) - 15.0
    assert strong.mean() > 0.3, "test signal too sparse to compare"
    assert diff[strong].max() < 1e-3, f"max abs diff {diff[strong].max():.2e} on strong bins"
    # All bins, weak ones included: measured mean 6e-6 (speech) and 2.4e-4 (chirp).
    assert diff.mean() < 1e-3, f"mean abs diff {diff.mean():.2e}"
    # lhotse's own [-1, 1] convention: power scales by 32768**2, i.e. a constant log offset, except
    # where lhotse clamps mel energy at float32 eps (log -15.9), which quiet speech bins reach at
    # that scale; int16 scaling keeps ours well clear of any floor.
    unscaled = lhotse_fbank(x)
    unfloored = strong & (unscaled > math.log(np.finfo(np.float32).eps) + 1.0)
    np.testing.assert_allclose(unscaled[unfloored] + INT16_LOG_POWER, ours[unfloored], atol=1e-3)


def test_load_audio_reads_channel0_as_float(tmp_path, librispeech_dir, speech):
    flac = librispeech_dir / "test-clean/1089/134686/1089-134686-0001.flac"
    pcm, sr = sf.read(str(flac), dtype="int16")
    assert sr == SR and speech.dtype == np.float32
    np.testing.assert_array_equal(speech, pcm.astype(np.float32) / 32768.0)
    stereo = tmp_path / "stereo.wav"
    sf.write(str(stereo), np.stack([pcm, -pcm], axis=1), SR, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(str(stereo), SR), speech)


def test_flac_decodes_through_dr_flac_sample_for_sample_as_libsndfile(tmp_path, librispeech_dir):
    from hpc_asr.data.features import _read_flac

    flacs = sorted(librispeech_dir.glob("test-clean/*/*/*.flac"))
    pcm, sr = sf.read(str(flacs[0]), dtype="float32")
    sf.write(str(tmp_path / "stereo24.flac"), np.stack([pcm, -pcm / 3], axis=1), sr, subtype="PCM_24")
    for path in [*flacs, tmp_path / "stereo24.flac"]:
        fast = _read_flac(str(path))
        assert fast is not None, f"{path.name}: not decoded by dr_flac"
        data, rate, integer = fast
        want, want_rate = sf.read(str(path), dtype="float32", always_2d=True)
        assert rate == want_rate and integer and data.dtype == np.float32
        np.testing.assert_array_equal(data, want)


def test_flac_that_states_no_length_is_decoded_whole(tmp_path, librispeech_dir, speech):
    raw = bytearray((librispeech_dir / "test-clean/1089/134686/1089-134686-0001.flac").read_bytes())
    # STREAMINFO starts at byte 8; its 36-bit total-samples field ends at byte 26 (0 = unknown).
    raw[21] &= 0xF0
    raw[22:26] = bytes(4)
    path = tmp_path / "streamed.flac"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError):  # what libsndfile makes of it (the old path rejected these)
        sf.read(str(path), dtype="float32")
    np.testing.assert_array_equal(load_audio(str(path), SR), speech)


def test_flac_without_miniaudio_goes_through_libsndfile(monkeypatch, librispeech_dir, speech):
    from hpc_asr.data.features import _read_flac

    monkeypatch.setitem(sys.modules, "miniaudio", None)  # as on a node whose wheels lack it
    path = str(librispeech_dir / "test-clean/1089/134686/1089-134686-0001.flac")
    assert _read_flac(path) is None
    np.testing.assert_array_equal(load_audio(path, SR), speech)


def test_truncated_flac_is_rejected_not_decoded_short(tmp_path, librispeech_dir):
    raw = (librispeech_dir / "test-clean/1089/134686/1089-134686-0000.flac").read_bytes()
    path = tmp_path / "cut.flac"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AudioError, match=r"cut\.flac: cannot decode audio \(truncated or corrupt FLAC"):
        load_audio(str(path), SR)


def test_load_audio_wrong_rate_names_file(tmp_path):
    path = tmp_path / "eight_k.wav"
    sf.write(str(path), np.zeros(8000, np.int16), 8000)
    with pytest.raises(AudioError, match=r"eight_k\.wav: sample rate 8000 Hz, expected 16000 Hz"):
        load_audio(str(path), SR)


@pytest.mark.parametrize("content", [b"", b"fLaC" + bytes(range(256)) * 4, b"RIFF\x00\x00"])
def test_load_audio_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.flac"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=r"broken\.flac: cannot decode audio"):
        load_audio(str(path), SR)


def test_load_audio_missing_and_empty(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.flac"):
        load_audio(str(tmp_path / "nope.flac"), SR)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.int16), SR)
    with pytest.raises(AudioError, match=r"empty\.wav: no samples"):
        load_audio(str(empty), SR)


def test_cmvn_halves_merge_to_whole(speech):
    feats = fbank(speech, CFG)
    whole, a, b = CmvnStats.zeros(80), CmvnStats.zeros(80), CmvnStats.zeros(80)
    whole.add(feats)
    a.add(feats[:100])
    b.add(feats[100:])
    assert a.count + b.count == whole.count == len(feats)
    np.testing.assert_allclose(a.sum + b.sum, whole.sum, rtol=1e-12)
    np.testing.assert_allclose(a.sumsq + b.sumsq, whole.sumsq, rtol=1e-12)
    merged = CmvnStats(a.sum + b.sum, a.sumsq + b.sumsq, a.count + b.count)
    mean, std = merged.mean_std()
    np.testing.assert_allclose(mean, feats.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, feats.astype(np.float64).std(0), rtol=1e-4)


def test_cmvn_floors_variance_and_rejects_empty():
    stats = CmvnStats.zeros(3)
    with pytest.raises(ValueError, match="zero frames"):
        stats.mean_std()
    stats.add(np.ones((5, 3), np.float32))
    mean, std = stats.mean_std(floor=1e-4)
    np.testing.assert_allclose(mean, 1.0)
    np.testing.assert_allclose(std, 1e-2, rtol=1e-5)  # constant input: std is sqrt(floor), never 0


@pytest.mark.parametrize("backend", ["torch", "torchaudio"])
@pytest.mark.parametrize("signal", ["speech", "chirp"])
def test_backends_match_kaldi_native(signal, speech, backend):
    """kaldi-native-fbank is Kaldi's own C++ algorithm: every other backend must agree with it as
    closely as two float32 implementations can (measured: max 2.8e-4 on speech bins)."""
    x = speech if signal == "speech" else chirp()
    ref = fbank(x, backend_cfg("kaldi_native"))
    ours = fbank(x, backend_cfg(backend))
    strong = ref > ref.max(axis=1, keepdims=True) - 15.0
    assert np.abs(ours - ref)[strong].max() < 1e-3
    assert np.abs(ours - ref).mean() < 1e-3


def test_torch_backend_on_cuda(speech):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    np.testing.assert_allclose(fbank(speech, CFG, "cuda"), fbank(speech, CFG), atol=2e-3)


def test_default_backend_is_torch_and_unknown_is_one_line():
    assert CFG.backend == "torch" and "torch" in INSTALLED and "kaldi_native" in INSTALLED
    with pytest.raises(ConfigError, match=r"features\.backend: 'kaldi', expected torch, kaldi_native or torchaudio"):
        FeatureConfig(backend="kaldi")


def test_load_audio_convert_resamples_and_downmixes(tmp_path, speech):
    import soxr

    path = tmp_path / "st44.wav"
    up = soxr.resample(speech, SR, 44100)
    sf.write(str(path), np.stack([up, 0.5 * up], axis=1), 44100, subtype="FLOAT")
    with pytest.raises(AudioError, match="sample rate 44100 Hz, expected 16000 Hz"):
        load_audio(str(path), SR)  # training and latency never resample silently
    got = load_audio(str(path), SR, convert=True)
    assert abs(len(got) - len(speech)) <= 1
    n = min(len(got), len(speech))
    # Channel mean (0.75 x) of a 16k -> 44.1k -> 16k round trip: within resampler ripple of the source.
    assert np.abs(got[:n] - 0.75 * speech[:n]).max() < 0.02
    sf.write(str(path), np.zeros(8000, np.float32), 2000)
    with pytest.raises(AudioError, match="sample rate 2000 Hz cannot be resampled"):
        load_audio(str(path), SR, convert=True)


def test_load_audio_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    x = np.zeros(1600, np.float32)
    x[5] = np.inf
    sf.write(str(path), x, SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: NaN or Inf samples"):
        load_audio(str(path), SR)


@pytest.mark.parametrize("signal", ["speech", "chirp"])
def test_signal_level_preprocessing_equals_kaldi_per_frame(signal, speech):
    """The torch backend pre-emphasises the whole signal once and corrects the DC term per frame;
    the windowed frames must equal Kaldi's per-frame steps (DC removal, pre-emphasis, povey)."""
    import torch

    from hpc_asr.data.features import _frames, _frames_dithered, _sizes, _tables

    x = torch.from_numpy((speech if signal == "speech" else chirp()) * 32768.0)
    win, shift, nfft = _sizes(CFG)
    window, _ = _tables(SR, win, nfft, 80, CFG.low_freq, CFG.high_freq, "cpu")
    t = num_frames(len(x), CFG)
    fast, ref = torch.empty(t, win), torch.empty(t, win)
    _frames(fast, x, window, shift)
    _frames_dithered(ref, x.double(), window.double(), shift, 0.0)  # float64 reference, no noise
    scale = ref.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    assert ((fast.double() - ref) / scale).abs().max() < 1e-5
