"""The corpus plan: which utterances exist, in which split, spoken by which engine and voice, with
which prosody.

Every rank builds the identical list from ``--seed`` alone, so the corpus does not depend on
the number of ranks or jobs.  Held-out splits: dev and test hold out sentences (no dev/test text
occurs in train) and voices.  espeak-ng's voices are accent+variant pairs: dev and test get pairs
never seen in training, new combinations of an accent and a variant that each appear in training
(`split_speakers`).  An engine with a handful of voices (MBROLA, Pico, RHVoice) holds whole voices
out (`split_voices`).  The festival splits (test_festival, dev_festival) come from an engine that
never speaks training audio.

Per engine a `Prosody` gives the ranges that speed, pitch and word gaps are drawn from, in that
engine's own units, so every utterance has its own rate and pitch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from data_prep.recipes.voice_assistant import grammar

__all__ = ["CorpusError", "EngineMissing", "EngineVoices", "Prosody", "Utt", "estimate_seconds", "plan_corpus",
           "speaker_id", "split_speakers", "split_voices"]

LEAD_SILENCE = (0.05, 0.25)   # seconds of padding before / after speech (after trimming espeak's own)
TRAIL_SILENCE = (0.05, 0.30)
PEAK_RANGE = (0.25, 0.90)     # output peak level, so loudness varies between utterances
NOISE_PROB = 0.6              # share of utterances that get white noise ...
SNR_RANGE_DB = (25.0, 45.0)   # ... at this signal-to-noise ratio
HELDOUT_FRAC = 0.10           # share of accent+variant pairs for dev, and again for test
DISTINCT_DEV_TEST_VOICES = 5  # an engine with at least this many voices gets different dev and test voices
# Seconds of speech per (character / wpm); calibrated on this grammar with espeak-ng 1.51.
SECONDS_PER_CHAR_WPM = 8.9
ESPEAK_OVERHEAD_S = 0.11     # what is left of espeak-ng's own silence after trim_silence()
NOMINAL_WPM = 165             # the speaking rate `Prosody.nominal` stands for


class CorpusError(Exception):
    """The corpus cannot be made as asked; reported as one line on stderr with exit status 2."""


class EngineMissing(CorpusError):
    """A speech engine (or all of its voices) is not installed; the message is one line with the fix."""


@dataclass(frozen=True)
class Prosody:
    """Per-utterance draw ranges of one engine, in its own units (inclusive integer ranges)."""
    speed: tuple[int, int]            # espeak-ng/MBROLA words a minute; Pico, RHVoice percent of normal
    pitch: tuple[int, int]            # espeak-ng -p 0..99; Pico, RHVoice percent of normal
    gap: tuple[int, int] = (0, 0)     # extra pause between words, 10 ms units (espeak-ng -g)
    nominal: int = NOMINAL_WPM        # the speed value at which the engine speaks about NOMINAL_WPM words a minute


# Which voices of one engine each split uses: {"train": [...], "dev": [...], "test": [...]}, or for
# festival {"test_festival": [...], "dev_festival": [...]}.
EngineVoices = dict[str, list[str]]


def speaker_id(engine: str, voice: str) -> str:
    """The manifest's ``speaker``: espeak-ng keeps its ``accent+variant``; other engines ``engine+voice``."""
    return voice if engine == "espeak" else f"{engine}+{voice}"


def split_speakers(accents: list[str], variants: list[str], seed: int,
                   frac: float = HELDOUT_FRAC) -> dict[str, list[str]]:
    """Assign each accent+variant pair to train, dev or test.

    Pairs are visited in a seeded order and held out only while training keeps at least
    half (and at least one) of the pairs of that accent and of that variant, so dev/test
    voices are new combinations of familiar parts.  Returns speaker ids per split.
    """
    pairs = [(a, v) for a in accents for v in variants]
    random.Random(f"speakers-{seed}").shuffle(pairs)
    n_held = max(1, round(frac * len(pairs)))
    left_a = {a: len(variants) for a in accents}     # train pairs per accent
    left_v = {v: len(accents) for v in variants}     # train pairs per variant
    min_a = max(1, math.ceil(len(variants) / 2))
    min_v = max(1, math.ceil(len(accents) / 2))
    held: dict[str, list[str]] = {"dev": [], "test": []}
    train: list[str] = []
    for a, v in pairs:
        split = next((s for s in ("dev", "test") if len(held[s]) < n_held), None)
        if split and left_a[a] > min_a and left_v[v] > min_v:
            held[split].append(f"{a}+{v}")
            left_a[a] -= 1
            left_v[v] -= 1
        else:
            train.append(f"{a}+{v}")
    if not held["dev"] or not held["test"]:
        raise CorpusError(f"too few voices to hold out speakers: {len(pairs)} pairs")
    return {"train": sorted(train), "dev": sorted(held["dev"]), "test": sorted(held["test"])}


def split_voices(engine: str, voices: list[str], seed: int) -> EngineVoices:
    """Hold out whole voices of an engine with few of them.

    With ``DISTINCT_DEV_TEST_VOICES`` or more voices dev and test each get their own voice; with two
    to four, one held-out voice speaks both dev and test (their sentences differ), so training
    keeps as many of the few real speakers as it can; a single voice holds out sentences only.
    The choice is seeded per engine.
    """
    order = sorted(voices)
    random.Random(f"voices-{engine}-{seed}").shuffle(order)
    if len(order) >= DISTINCT_DEV_TEST_VOICES:
        return {"train": sorted(order[2:]), "dev": [order[0]], "test": [order[1]]}
    if len(order) >= 2:
        return {"train": sorted(order[1:]), "dev": [order[0]], "test": [order[0]]}
    return {"train": list(order), "dev": list(order), "test": list(order)}


@dataclass
class Utt:
    """Everything needed to render one utterance, fixed before any audio is made."""
    index: int
    id: str
    split: str
    text: str
    speaker: str
    speed: int
    pitch: int
    gap: int
    lead: float
    trail: float
    peak: float
    snr_db: float | None
    engine: str = "espeak"
    voice: str = ""


def estimate_seconds(text: str, speed: int, lead: float = 0.0, trail: float = 0.0, gap: int = 0,
                     nominal: int = NOMINAL_WPM) -> float:
    """Rough audio length, used only to pick how many training sentences reach --hours."""
    words_gap = 0.01 * gap * text.count(" ")
    wpm = speed * NOMINAL_WPM / nominal
    return SECONDS_PER_CHAR_WPM * len(text) / wpm + ESPEAK_OVERHEAD_S + lead + trail + words_gap


def _make_utt(index: int, split: str, n: int, text: str, engine: str, voice: str, prosody: Prosody,
              rng: random.Random) -> Utt:
    return Utt(index=index, id=f"{split}_{n:06d}", split=split, text=text, speaker=speaker_id(engine, voice),
               speed=rng.randint(*prosody.speed), pitch=rng.randint(*prosody.pitch),
               gap=rng.randint(*prosody.gap), lead=round(rng.uniform(*LEAD_SILENCE), 3),
               trail=round(rng.uniform(*TRAIL_SILENCE), 3),
               peak=round(rng.uniform(*PEAK_RANGE), 3),
               snr_db=round(rng.uniform(*SNR_RANGE_DB), 1) if rng.random() < NOISE_PROB
               else None, engine=engine, voice=voice)


def _voice_cycle(voices: list[str], rng: random.Random):
    """Round-robin over voices in fresh shuffles, so every voice gets a fair share."""
    while True:
        order = list(voices)
        rng.shuffle(order)
        yield from order


def plan_corpus(voices: dict[str, EngineVoices], prosody: dict[str, Prosody], hours: float, dev_utts: int,
                test_utts: int, seed: int, festival_utts: int = 0, festival_dev_utts: int = 0,
                weights: dict[str, int] | None = None) -> list[Utt]:
    """Texts and voice settings for all utterances.

    ``voices`` maps each training engine (in order) to its `EngineVoices`, and ``"festival"`` (if
    present) to its test_festival/dev_festival voices.  dev and test get ``dev_utts`` and
    ``test_utts`` sentences per training engine; training engines take turns utterance by
    utterance (an engine of weight w takes w turns in a row) until the estimated audio reaches
    ``hours``.  No held-out text occurs in train.
    """
    text_rng = random.Random(f"text-{seed}")
    voice_rng = random.Random(f"voice-{seed}")
    stream = grammar.sentence_stream(text_rng)
    engines = [e for e in voices if e != "festival"]
    utts: list[Utt] = []
    heldout_texts: set[str] = set()
    held = [(split, e, count) for split, count in (("dev", dev_utts), ("test", test_utts)) for e in engines]
    held += [(split, "festival", count) for split, count in (("test_festival", festival_utts),
                                                              ("dev_festival", festival_dev_utts))]
    numbers: dict[str, int] = {}
    for split, engine, count in held:
        names = voices.get(engine, {}).get(split, [])
        if count and not names:
            raise CorpusError(f"no {engine} voices for the {split} split")
        cycle = _voice_cycle(names, voice_rng) if count else None
        for _ in range(count):
            text = next(stream)
            heldout_texts.add(text)
            numbers[split] = numbers.get(split, 0) + 1
            utts.append(_make_utt(len(utts), split, numbers[split], text, engine, next(cycle), prosody[engine],
                                  voice_rng))
    cycles = {e: _voice_cycle(voices[e]["train"], voice_rng) for e in engines}
    turns = [e for e in engines for _ in range((weights or {}).get(e, 1))]
    budget, n = hours * 3600.0, 0
    while budget > 0 and turns:
        text = next(stream)
        if text in heldout_texts:   # only possible if the grammar ran out of new sentences
            continue
        engine = turns[n % len(turns)]
        n += 1
        utt = _make_utt(len(utts), "train", n, text, engine, next(cycles[engine]), prosody[engine], voice_rng)
        utts.append(utt)
        budget -= estimate_seconds(text, utt.speed, utt.lead, utt.trail, utt.gap, prosody[engine].nominal)
    return utts
