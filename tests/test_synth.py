"""Tests for the voice-assistant corpus: its engines, splits, manifests and text grammar.

One tiny corpus is synthesized through the real CLI with every training engine that is installed
(a few seconds); each engine's speech is checked in test_synth_voices.py.  Split logic and the grammar
are tested directly so they can use realistic sizes without making audio.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.recipes.voice_assistant import (
    audio,
    engines,
    espeak,
    festival,
    grammar,
    mbrola,
    pico,
    plan,
    rhvoice,
    slots,
    synth,
)
from hpc_asr.data.manifest import read_manifest as read_utterances

ROOT = Path(__file__).resolve().parents[1]
CHARSET = re.compile(r"^[a-z']+( [a-z']+)*$")
TINY_ARGS = ["--hours", "0.01", "--dev-utts", "4", "--test-utts", "4", "--festival-utts", "6",
             "--festival-dev-utts", "5", "--engines", "espeak,mbrola,pico,rhvoice", "--seed", "3", "--jobs", "2"]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("festival") is None,
                                  reason="espeak-ng or festival is not installed")
MODULES = {"espeak": espeak, "mbrola": mbrola, "pico": pico, "rhvoice": rhvoice}
FIELDS = {"id", "audio", "duration", "text", "speaker", "engine", "voice"}


def installed(name: str) -> bool:
    try:
        MODULES[name].splits(0)
    except plan.EngineMissing:
        return False
    return True


INSTALLED = [name for name in MODULES if installed(name)]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_asr", "prep", "voice-assistant", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env, check=False)


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
    per_engine = len(INSTALLED)
    for split, expected in (("train", None), ("dev", 4 * per_engine), ("test", 4 * per_engine), ("test_festival", 6),
                            ("dev_festival", 5)):
        rows = read_manifest(corpus / f"{split}.jsonl")
        assert rows and (expected is None or len(rows) == expected)
        for row in rows:
            assert set(row) == FIELDS
            info = sf.info(corpus / row["audio"])   # audio is relative to the manifest dir
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert abs(info.frames / 16000 - row["duration"]) < 1e-3
            assert 0.5 < row["duration"] < 15
            assert CHARSET.match(row["text"]), row["text"]


@needs_espeak
def test_manifests_record_engine_and_voice(corpus: Path):
    """Every entry names its engine and voice (read back by the manifest module); every installed training
    engine speaks training, dev and test audio, with voices of its own."""
    summary = json.loads((corpus / "corpus.json").read_text())
    for split in synth.SPLITS:
        utts = read_utterances(corpus / f"{split}.jsonl")
        for u in utts:
            assert u.engine and u.voice and u.speaker == plan.speaker_id(u.engine, u.voice)
            assert u.voice in summary["voices"][u.engine][split]
        engines_here = {u.engine for u in utts}
        assert engines_here == ({"festival"} if split.endswith("festival") else set(INSTALLED))
        assert set(summary["splits"][split]["engines"]) == engines_here


@needs_espeak
def test_heldout_speakers_and_texts_are_unseen(corpus: Path):
    train = read_manifest(corpus / "train.jsonl")
    train_speakers = {r["speaker"] for r in train}
    train_texts = {r["text"] for r in train}
    for split in ("dev", "test", "test_festival", "dev_festival"):
        rows = read_manifest(corpus / f"{split}.jsonl")
        assert not train_speakers & {r["speaker"] for r in rows}
        assert not train_texts & {r["text"] for r in rows}


@needs_espeak
def test_no_festival_audio_in_training(corpus: Path):
    """festival speaks only its two splits; no other split holds festival audio, and the festival splits
    hold no other engine and share no sentence with the others or each other."""
    texts = {}
    for split in synth.SPLITS:
        rows = read_manifest(corpus / f"{split}.jsonl")
        is_festival = [r["engine"] == "festival" or r["speaker"].startswith("festival+") for r in rows]
        assert all(is_festival) if split.endswith("festival") else not any(is_festival), split
        texts[split] = {r["text"] for r in rows}
    for split in ("test_festival", "dev_festival"):
        voices = {r["voice"] for r in read_manifest(corpus / f"{split}.jsonl")}
        assert voices and voices <= set(festival.FESTIVAL_VOICES)
        assert not texts[split] & set().union(*(t for s, t in texts.items() if s != split))


def test_festival_voices_are_not_training_speakers():
    """festival's voices, front end and MBROLA voices stay out of training; RHVoice's slt (festival's HTS
    speaker) too, and festival is no training engine."""
    assert not any("mbrola" in v or v.split("_")[0] in mbrola.VOICES for v in festival.FESTIVAL_VOICES)
    assert "slt" not in rhvoice.VOICES and set(rhvoice.VOICES) == {"bdl", "clb"}
    assert "festival" not in engines.TRAINING_ENGINES
    with pytest.raises(ValueError, match="festival"):
        engines.parse_engines("espeak,festival")


def test_festival_script_speaks_each_text_with_its_voice(tmp_path: Path):
    utt = plan.Utt(0, "test_festival_000001", "test_festival", "what's the time", "festival+kal_diphone",
                   300, 50, 0, 0.1, 0.1, 0.5, None, "festival", "kal_diphone")
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
    res = run_cli("--out", str(tmp_path / "va"), *TINY_ARGS[:-6], env={"PATH": str(empty_bin)})
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "espeak-ng" in res.stderr


@needs_espeak
def test_missing_engine_is_one_line_and_skipped(tmp_path: Path):
    """An engine that is not installed (RHVoice-test not on PATH) is one line naming it and its packages; the
    corpus is made from the others, and is not taken as up to date on the next run.  ``--require-engines``
    makes it a one-line error (exit 2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "espeak-ng").symlink_to(shutil.which("espeak-ng"))
    env = {**os.environ, "PATH": str(bin_dir)}
    args = ["--hours", "0.002", "--dev-utts", "1", "--test-utts", "1", "--festival-utts", "0", "--festival-dev-utts",
            "0", "--engines", "espeak,rhvoice", "--jobs", "1"]
    res = run_cli("--out", str(tmp_path / "va"), *args, env=env)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if "rhvoice" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("[synth] skipping engine rhvoice:") and "apt-get install rhvoice" \
        in lines[0]
    assert {r["engine"] for r in read_manifest(tmp_path / "va" / "train.jsonl")} == {"espeak"}
    again = run_cli("--out", str(tmp_path / "va"), *args, env=env)   # not "up to date": rhvoice may be installed now
    assert again.returncode == 0 and "up to date" not in again.stderr and "skipping engine rhvoice" in again.stderr
    res = run_cli("--out", str(tmp_path / "vb"), *args, "--require-engines", env=env)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "rhvoice" in res.stderr


@pytest.mark.parametrize("spec", ["espeak,festival", "espeak,sapi", ""])
def test_engines_option_errors_are_one_line(spec: str, tmp_path: Path):
    res = run_cli("--out", str(tmp_path / "va"), "--engines", spec)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--engines" in res.stderr


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


def test_split_voices_holds_out_whole_voices():
    many = [f"v{i}" for i in range(6)]
    split = plan.split_voices("x", many, 0)
    assert len(split["dev"]) == len(split["test"]) == 1 and split["dev"] != split["test"]
    assert sorted(split["train"] + split["dev"] + split["test"]) == many
    for voices in (["us1", "us2", "us3", "en1"], ["bdl", "clb"]):
        split = plan.split_voices("x", voices, 0)
        assert split["dev"] == split["test"] and len(split["dev"]) == 1 and split["dev"][0] not in split["train"]
        assert sorted(split["train"] + split["dev"]) == sorted(voices)
    assert plan.split_voices("x", ["solo"], 0) == {"train": ["solo"], "dev": ["solo"], "test": ["solo"]}


def _voices() -> dict[str, plan.EngineVoices]:
    return {"espeak": plan.split_speakers(list(espeak.ACCENTS), list(espeak.VARIANTS), 0),
            "mbrola": plan.split_voices("mbrola", list(mbrola.VOICES), 0),
            "pico": plan.split_voices("pico", list(pico.VOICES), 0),
            "festival": {s: list(festival.FESTIVAL_VOICES) for s in festival.SPLITS}}


def test_plan_corpus_splits_are_disjoint_and_deterministic():
    voices = _voices()
    prosody = engines.prosody(["espeak", "mbrola", "pico"])
    utts = plan.plan_corpus(voices, prosody, 1.0, 100, 100, 0, festival_utts=100, festival_dev_utts=50)
    by_split = {s: [u for u in utts if u.split == s] for s in synth.SPLITS}
    assert len(by_split["dev"]) == len(by_split["test"]) == 300 and len(by_split["test_festival"]) == 100
    assert len(by_split["dev_festival"]) == 50
    train_texts = {u.text for u in by_split["train"]}
    for split in synth.SPLITS:
        for u in by_split[split]:
            assert u.voice in voices[u.engine][split] and u.speaker == plan.speaker_id(u.engine, u.voice)
            lo, hi = prosody[u.engine].speed
            assert lo <= u.speed <= hi
        if split != "train":
            assert not train_texts & {u.text for u in by_split[split]}
    counts = [sum(u.engine == e for u in by_split["train"]) for e in ("espeak", "mbrola", "pico")]
    assert max(counts) - min(counts) <= 1                     # engines take turns
    estimated = sum(plan.estimate_seconds(u.text, u.speed, u.lead, u.trail, u.gap, prosody[u.engine].nominal)
                    for u in by_split["train"])
    assert 3600 <= estimated < 3600 + 20
    assert len({u.id for u in utts}) == len(utts)
    assert [u.index for u in utts] == list(range(len(utts)))
    assert utts == plan.plan_corpus(voices, prosody, 1.0, 100, 100, 0, festival_utts=100, festival_dev_utts=50)


@needs_espeak
def test_voice_coverage_every_english_accent_and_wide_ranges():
    """Every non-MBROLA English espeak-ng voice, the six Klatt variants, wide prosody ranges."""
    accents, variants = espeak.available_voices()
    assert set(accents) == set(espeak.ACCENTS)
    assert {f"klatt{i}" for i in ("", 2, 3, 4, 5, 6)} <= set(variants) and len(variants) >= 60
    speed, pitch = espeak.PROSODY.speed, espeak.PROSODY.pitch
    assert speed[1] - speed[0] >= 100 and pitch[1] - pitch[0] >= 70 and espeak.PROSODY.gap[1] > 0
    for module in (mbrola, pico, rhvoice):   # every engine draws rate and pitch per utterance
        assert module.PROSODY.speed[1] > module.PROSODY.speed[0] and module.PROSODY.pitch[1] > module.PROSODY.pitch[0]


def test_mpi_rank_size_from_environment():
    assert synth.mpi_rank_size({}) == (0, 1, 1)
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert synth.mpi_rank_size(ompi) == (1, 4, 2)
    assert synth.mpi_rank_size({"PMI_RANK": "2", "PMI_SIZE": "3"}) == (2, 3, 3)


# ---- audio helpers ---------------------------------------------------------------------

def test_corpus_resamples_as_prep_does():
    from hpc_asr.data import features

    assert audio.resample is features.resample


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
                   speed=160, pitch=50, gap=0, lead=0.1, trail=0.1, peak=0.5, snr_db=None, voice="en-us+m1")
    (tmp_path / "wav" / "train").mkdir(parents=True)
    row = engines.synthesize(utt, tmp_path, seed=0)
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


def test_engine_weights_share_the_training_utterances():
    """``espeak:3,mbrola`` gives espeak-ng three training utterances for each MBROLA one; a bad
    weight or a name given twice is one clear error."""
    assert engines.parse_engines("espeak:3, mbrola") == {"espeak": 3, "mbrola": 1}
    for bad, word in (("espeak:0", "weight"), ("espeak:x", "weight"), ("espeak,espeak", "twice"), ("", "no engine")):
        with pytest.raises(ValueError, match=word):
            engines.parse_engines(bad)
    names = ["espeak", "mbrola"]
    voices = {"espeak": {"train": ["en-us+m1"], "dev": ["en-us+m2"], "test": ["en-us+m3"]},
              "mbrola": {"train": ["us1"], "dev": ["us2"], "test": ["us3"]}}
    utts = plan.plan_corpus(voices, engines.prosody(names), 0.5, 2, 2, 0, weights={"espeak": 3, "mbrola": 1})
    train = [u.engine for u in utts if u.split == "train"]
    assert len(train) > 40 and abs(train.count("espeak") / len(train) - 0.75) < 0.03
    even = plan.plan_corpus(voices, engines.prosody(names), 0.5, 2, 2, 0)
    assert abs([u.engine for u in even if u.split == "train"].count("espeak") / len(even) - 0.5) < 0.05
