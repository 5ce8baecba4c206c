"""Tests for the espeak-ng corpus synthesizer and its text grammar.

One tiny corpus is synthesized through the real CLI (a few seconds); split logic and the
grammar are tested directly so they can use realistic sizes without making audio.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.recipes.voice_assistant import audio, espeak, festival, grammar, plan, slots, synth

ROOT = Path(__file__).resolve().parents[1]
CHARSET = re.compile(r"^[a-z']+( [a-z']+)*$")
TINY_ARGS = ["--hours", "0.01", "--dev-utts", "4", "--test-utts", "4", "--festival-utts", "6",
             "--seed", "3", "--jobs", "2"]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("festival") is None,
                                  reason="espeak-ng or festival is not installed")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_asr", "prep", "voice-assistant", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env, check=False)


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("va")
    res = run_cli("--out", str(out), *TINY_ARGS)
    assert res.returncode == 0, res.stderr
    return out


# ---- the synthesized corpus -------------------------------------------------------------

@needs_espeak
def test_manifests_and_audio(corpus: Path):
    for split, expected in (("train", None), ("dev", 4), ("test", 4), ("test_festival", 6)):
        rows = read_manifest(corpus / f"{split}.jsonl")
        assert rows and (expected is None or len(rows) == expected)
        for row in rows:
            assert set(row) == {"id", "audio", "duration", "text", "speaker"}
            info = sf.info(corpus / row["audio"])   # audio is relative to the manifest dir
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert abs(info.frames / 16000 - row["duration"]) < 1e-3
            assert 0.5 < row["duration"] < 15
            assert CHARSET.match(row["text"]), row["text"]


@needs_espeak
def test_heldout_speakers_and_texts_are_unseen(corpus: Path):
    train = read_manifest(corpus / "train.jsonl")
    train_speakers = {r["speaker"] for r in train}
    train_texts = {r["text"] for r in train}
    for split in ("dev", "test", "test_festival"):
        rows = read_manifest(corpus / f"{split}.jsonl")
        assert not train_speakers & {r["speaker"] for r in rows}
        assert not train_texts & {r["text"] for r in rows}


@needs_espeak
def test_festival_split_is_another_engine_never_in_training(corpus: Path):
    """test_festival: festival voices only, no espeak-ng voice; no other split holds festival."""
    rows = read_manifest(corpus / "test_festival.jsonl")
    voices = {r["speaker"] for r in rows}
    assert len(rows) == 6 and voices and all(v.startswith("festival+") for v in voices)
    assert {v.split("+")[1] for v in voices} <= set(festival.FESTIVAL_VOICES)
    for split in ("train", "dev", "test"):
        assert not any(r["speaker"].startswith("festival+") for r in read_manifest(corpus / f"{split}.jsonl"))
    other = {r["text"] for s in ("dev", "test") for r in read_manifest(corpus / f"{s}.jsonl")}
    assert not other & {r["text"] for r in rows}


def test_festival_script_speaks_each_text_with_its_voice(tmp_path: Path):
    utt = plan.Utt(0, "test_festival_000001", "test_festival", "what's the time", "festival+kal_diphone",
                    300, 50, 0, 0.1, 0.1, 0.5, None)
    script = festival.festival_script([utt], tmp_path)
    assert "(voice_kal_diphone)" in script and '"what\'s the time"' in script
    assert f"Duration_Stretch {festival.STRETCH_RANGE[0]:.3f}" in script  # fast speech, clamped stretch


@needs_espeak
def test_summary_and_idempotence(corpus: Path):
    summary = json.loads((corpus / "corpus.json").read_text())
    for split in synth.SPLITS:
        rows = read_manifest(corpus / f"{split}.jsonl")
        assert summary["splits"][split]["utterances"] == len(rows)
        assert summary["splits"][split]["hours"] == pytest.approx(
            sum(r["duration"] for r in rows) / 3600, abs=1e-3)
    assert summary["seed"] == 3 and summary["failed"] == []
    before = (corpus / "train.jsonl").stat().st_mtime_ns
    res = run_cli("--out", str(corpus), *TINY_ARGS)
    assert res.returncode == 0 and "corpus up to date" in res.stderr
    assert (corpus / "train.jsonl").stat().st_mtime_ns == before


def test_missing_espeak_is_one_line_exit_2(tmp_path: Path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    res = run_cli("--out", str(tmp_path / "va"), *TINY_ARGS, env={"PATH": str(empty_bin)})
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "espeak-ng" in res.stderr


# ---- speaker splits and planning (no audio) -----------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_split_speakers_holds_out_combinations_only(seed: int):
    accents, variants = list(espeak.ACCENTS), list(espeak.VARIANTS)
    split = plan.split_speakers(accents, variants, seed)
    train = set(split["train"])
    assert len(train) + len(split["dev"]) + len(split["test"]) == len(accents) * len(variants)
    n_held = round(plan.HELDOUT_FRAC * len(accents) * len(variants))
    for name in ("dev", "test"):
        held = set(split[name])
        assert len(held) == n_held and not held & train
        for speaker in held:
            accent, variant = speaker.split("+")
            assert any(s.startswith(accent + "+") for s in train)
            assert any(s.endswith("+" + variant) for s in train)
    assert not set(split["dev"]) & set(split["test"])
    assert {s.split("+")[0] for s in train} == set(accents)
    assert {s.split("+")[1] for s in train} == set(variants)
    assert split == plan.split_speakers(accents, variants, seed)   # deterministic


def test_split_speakers_tiny_grid():
    split = plan.split_speakers(["a1", "a2"], ["v1", "v2"], 0)
    assert len(split["dev"]) == len(split["test"]) == 1
    assert {s.split("+")[0] for s in split["train"]} == {"a1", "a2"}
    assert {s.split("+")[1] for s in split["train"]} == {"v1", "v2"}


def test_plan_corpus_splits_are_disjoint_and_deterministic():
    speakers = plan.split_speakers(list(espeak.ACCENTS), list(espeak.VARIANTS), 0)
    speakers["test_festival"] = [f"festival+{v}" for v in festival.FESTIVAL_VOICES]
    utts = plan.plan_corpus(speakers, 1.0, 200, 200, 0, festival_utts=100)
    by_split = {s: [u for u in utts if u.split == s] for s in synth.SPLITS}
    assert len(by_split["dev"]) == len(by_split["test"]) == 200 and len(by_split["test_festival"]) == 100
    train_texts = {u.text for u in by_split["train"]}
    for split in synth.SPLITS:
        assert {u.speaker for u in by_split[split]} <= set(speakers[split])
        if split != "train":
            assert not train_texts & {u.text for u in by_split[split]}
    estimated = sum(plan.estimate_seconds(u.text, u.speed, u.lead, u.trail, u.gap)
                    for u in by_split["train"])
    assert 3600 <= estimated < 3600 + 20
    assert len({u.id for u in utts}) == len(utts)
    assert [u.index for u in utts] == list(range(len(utts)))
    assert utts == plan.plan_corpus(speakers, 1.0, 200, 200, 0, festival_utts=100)


@needs_espeak
def test_voice_coverage_every_english_accent_and_wide_ranges():
    """Every non-MBROLA English espeak-ng voice, the six Klatt variants, wide prosody ranges."""
    accents, variants = espeak.available_voices()
    assert set(accents) == set(espeak.ACCENTS)
    assert {f"klatt{i}" for i in ("", 2, 3, 4, 5, 6)} <= set(variants) and len(variants) >= 60
    assert plan.SPEED_RANGE[1] - plan.SPEED_RANGE[0] >= 100 and plan.PITCH_RANGE[1] - plan.PITCH_RANGE[0] >= 70
    assert plan.WORD_GAP_RANGE[1] > 0


def test_mpi_rank_size_from_environment():
    assert synth.mpi_rank_size({}) == (0, 1, 1)
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert synth.mpi_rank_size(ompi) == (1, 4, 2)
    assert synth.mpi_rank_size({"PMI_RANK": "2", "PMI_SIZE": "3"}) == (2, 3, 3)


# ---- audio helpers ---------------------------------------------------------------------

def test_resample_keeps_a_tone():
    t = np.arange(22050) / 22050
    y = audio.resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 22050, 16000)
    assert len(y) == 16000
    ref = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.max(np.abs(y[500:-500] - ref[500:-500])) < 1e-3


def test_parse_wav_ignores_streaming_sizes():
    pcm = (np.arange(100, dtype="<i2") * 50).tobytes()
    header = (b"RIFF" + (0x7FFFFFFF).to_bytes(4, "little") + b"WAVE" + b"fmt " +
              (16).to_bytes(4, "little") + (1).to_bytes(2, "little") +
              (1).to_bytes(2, "little") + (22050).to_bytes(4, "little") +
              (44100).to_bytes(4, "little") + (2).to_bytes(2, "little") +
              (16).to_bytes(2, "little") + b"data" + (0x7FFFFFFF).to_bytes(4, "little"))
    x, rate = audio.parse_wav(header + pcm)
    assert rate == 22050 and len(x) == 100 and x[2] == pytest.approx(100 / 32768)


@needs_espeak
def test_failed_synthesis_is_reported_not_raised(tmp_path: Path):
    utt = plan.Utt(index=0, id="train_000001", split="train", text="", speaker="en-us+m1",
                    speed=160, pitch=50, gap=0, lead=0.1, trail=0.1, peak=0.5, snr_db=None)
    (tmp_path / "wav" / "train").mkdir(parents=True)
    row = espeak.synthesize(utt, tmp_path, seed=0)
    assert row["id"] == "train_000001" and "error" in row


# ---- grammar ---------------------------------------------------------------------------

def test_grammar_vocabulary_charset_and_lengths():
    texts = grammar.sentences(20000, random.Random(0))
    assert len(grammar.vocabulary(texts)) >= 400
    assert len(set(texts)) == len(texts)
    assert len(grammar.TEMPLATES) >= 60
    for text in texts:
        assert CHARSET.match(text), text
        assert grammar.MIN_WORDS <= len(text.split()) <= grammar.MAX_WORDS
    assert texts[:50] == grammar.sentences(50, 0)   # a seed reproduces the same sentences


def test_normalize_text_and_number_words():
    assert grammar.normalize_text("  Set a Timer: 25-minutes!  It's OK ") == \
        "set a timer minutes it's ok"
    assert slots.number_words(25) == "twenty five"
    assert slots.number_words(350, use_and=True) == "three hundred and fifty"
    assert slots.number_words(2024) == "two thousand twenty four"
    assert [slots.ordinal_words(n) for n in (1, 3, 12, 21, 30)] == \
        ["first", "third", "twelfth", "twenty first", "thirtieth"]


def test_one_normaliser_for_corpus_tokenizer_and_scoring():
    from hpc_asr.data import text, tokenizer

    for s in ["  Set a Timer: 25-minutes!  It's OK ", "ÀB--c''d\tE\nf", "", "twenty-five"]:
        assert grammar.normalize_text(s) == text.normalize(s) == tokenizer.normalize(s)
