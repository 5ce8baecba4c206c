"""data_prep.augment: every augmentation keeps lengths and dtypes, is deterministic under a seed,
is off when disabled, and the prep step writes a manifest that data_prep.fbank reads."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import mpirun_cmd, run

from data_prep import augment
from hpc_asr.config import AugmentConfig, ConfigError
from hpc_asr.data.manifest import Utterance, read_manifest, write_manifest

RATE = 16000
OFF = AugmentConfig(enabled=True, speeds="", noise_prob=0.0, reverb_prob=0.0)


def voice(seconds: float, f0: float, seed: int) -> np.ndarray:
    """A speech-like test signal: harmonics of f0 under a syllable-rate envelope, plus a little noise."""
    t = np.arange(int(seconds * RATE)) / RATE
    x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    x = x + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("augcorpus")
    utts = []
    for i in range(6):
        (d / "wav").mkdir(exist_ok=True)
        sf.write(d / "wav" / f"u{i}.wav", voice(1.0 + 0.3 * i, 110 + 20 * i, i), RATE, subtype="PCM_16")
        utts.append(Utterance(f"u{i}", f"wav/u{i}.wav", f"text {i}", 1.0 + 0.3 * i, f"s{i % 2}",
                              ("espeak", "pico")[i % 2], f"v{i}"))   # synthetic speech records engine and voice
    write_manifest(d / "train.jsonl", utts)
    return d / "train.jsonl"


def test_speed_perturbation_scales_length_keeps_dtype():
    x = voice(1.0, 120, 0)
    for f in (0.9, 1.1):
        y = augment.speed_perturb(x, f, RATE)
        assert y.dtype == np.float32 and len(y) == round(len(x) / f)
        # the pitch moves with the tempo: the spectrum's peak scales by the factor
        peak = np.argmax(np.abs(np.fft.rfft(y[:8000]))) * RATE / 8000
        assert peak == pytest.approx(120 * f, rel=0.03)
    assert augment.speed_perturb(x, 1.0, RATE) is x


def test_coloured_noise_slopes_and_snr():
    rng = np.random.default_rng(0)
    low_share = {}
    for kind in ("white", "pink", "brown"):
        n = augment.coloured_noise(32000, kind, rng)
        assert n.dtype == np.float32 and len(n) == 32000
        p = np.abs(np.fft.rfft(n)) ** 2
        low_share[kind] = p[: len(p) // 16].sum() / p.sum()
    assert low_share["white"] < low_share["pink"] < low_share["brown"]
    x = voice(1.0, 150, 1)
    noise = augment.coloured_noise(len(x), "pink", rng)
    y = augment.add_noise(x, noise, 10.0)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert y.dtype == np.float32 and len(y) == len(x) and snr == pytest.approx(10.0, abs=0.01)


def test_room_impulse_responses_are_seeded_and_reverberate_in_place():
    cfg = AugmentConfig(rirs=3, rt60_min=0.3, rt60_max=0.5)
    a, b = augment.rir_bank(cfg, RATE), augment.rir_bank(cfg, RATE)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], augment.rir_bank(replace(cfg, seed=1), RATE)[0])
    x = voice(1.0, 130, 2)
    y = augment.reverberate(x, a[0])
    assert y.dtype == np.float32 and len(y) == len(x) and not np.allclose(x, y)
    w = np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    yw = augment.reverberate(w, a[0])
    lag = np.argmax(np.abs(np.correlate(yw, w, "full"))) - (len(w) - 1)
    assert lag == 0  # aligned on the direct path: words do not move


def test_augment_one_is_deterministic_and_each_part_switches_off(corpus):
    others = read_manifest(corpus)
    cfg = AugmentConfig(enabled=True, noise_prob=1.0, reverb_prob=1.0, rirs=2)
    rirs = augment.rir_bank(cfg, RATE)
    x = voice(1.0, 140, 3)
    y1, d1 = augment.augment_one(x, RATE, cfg, np.random.default_rng(5), rirs, others)
    y2, d2 = augment.augment_one(x, RATE, cfg, np.random.default_rng(5), rirs, others)
    assert d1 == d2 and np.array_equal(y1, y2) and {"speed", "rir", "noise", "snr_db"} <= set(d1)
    y3, _ = augment.augment_one(x, RATE, cfg, np.random.default_rng(6), rirs, others)
    assert not np.array_equal(y1, y3)
    y, done = augment.augment_one(x, RATE, OFF, np.random.default_rng(5), rirs, others)
    assert done == {} and np.array_equal(y, x)  # every part off: the copy is the input
    assert set(augment.augment_one(x, RATE, replace(OFF, noise_prob=1.0, noise_types="babble"),
                                   np.random.default_rng(5), [], others)[1]) == {"noise", "snr_db"}


def _cli(corpus: Path, out: Path, *over: str):
    return run([sys.executable, "-m", "hpc_asr", "prep", "augment", "--manifest", str(corpus), "--out", str(out),
                "--augment.enabled", "true", "--augment.rirs", "3", "--augment.noise_prob", "0.8",
                "--augment.reverb_prob", "0.5", *over], timeout=120)


def test_cli_writes_copies_that_keep_rate_format_and_lengths(corpus, tmp_path):
    _cli(corpus, tmp_path / "a", "--augment.copies", "2")
    rows = read_manifest(tmp_path / "a" / "train.jsonl")
    src = {u.id: u for u in read_manifest(corpus)}
    summary = json.loads((tmp_path / "a" / "augment.json").read_text())
    assert len(rows) == 18 and summary["copies"] == 12 and summary["failed"] == []
    applied = {a["id"]: a for a in summary["applied"]}
    for u in rows:
        info = sf.info(u.audio)
        assert (info.samplerate, info.channels, info.subtype) == (RATE, 1, "PCM_16")
        orig = sf.info(src[u.id.split("-aug")[0]].audio).frames
        assert (u.engine, u.voice) == (src[u.id.split("-aug")[0]].engine, src[u.id.split("-aug")[0]].voice)
        speed = applied[u.id]["speed"] if u.id in applied else 1.0
        assert info.frames == round(orig / speed)
    written = [p for p in (tmp_path / "a").rglob("*") if p.is_file()]
    for path in written:  # old mtimes, so a rewrite is visible even with coarse timestamps
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert "up to date" in _cli(corpus, tmp_path / "a", "--augment.copies", "2").stderr
    assert [p for p in written if p.stat().st_mtime != 1_000_000_000] == []  # the rerun rewrote nothing
    assert sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file()) == sorted(written)


def test_cli_is_deterministic_and_rank_independent(corpus, tmp_path):
    _cli(corpus, tmp_path / "one")
    run(mpirun_cmd(2, "-m", "hpc_asr", "prep", "augment", "--manifest", str(corpus), "--out", str(tmp_path / "two"),
                   "--augment.enabled", "true", "--augment.rirs", "3", "--augment.noise_prob", "0.8",
                   "--augment.reverb_prob", "0.5"), timeout=180)
    a = sorted((tmp_path / "one" / "wav").glob("*.wav"))
    b = sorted((tmp_path / "two" / "wav").glob("*.wav"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 6
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))


def test_disabled_writes_the_originals_only(corpus, tmp_path):
    run([sys.executable, "-m", "hpc_asr", "prep", "augment", "--manifest", str(corpus), "--out", str(tmp_path / "off")],
        timeout=60)
    rows = read_manifest(tmp_path / "off" / "train.jsonl")
    assert [u.id for u in rows] == [u.id for u in read_manifest(corpus)]
    assert [Path(u.audio).resolve() for u in rows] == [Path(u.audio).resolve() for u in read_manifest(corpus)]
    assert not list((tmp_path / "off" / "wav").glob("*.wav"))


def test_bad_config_is_one_line(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"augment\.speeds"):
        AugmentConfig(speeds="0.9,fast")
    proc = run([sys.executable, "-m", "hpc_asr", "prep", "augment", "--manifest", str(corpus), "--out",
                str(tmp_path / "x"),
                "--augment.noise_prob", "1.5"], timeout=60, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "noise_prob" in proc.stderr
