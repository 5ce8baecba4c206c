"""The corpus plan: which utterances exist, in which split, with which voice and prosody.

Every rank builds the identical list from ``--seed`` alone, so the corpus does not depend on
the number of ranks or jobs.  Held-out splits: dev and test use speakers (accent+variant pairs)
never seen in training and sentences never seen in training.  Whole accents or variants are
never held out, only combinations, so a test speaker is a new mix of an accent and a variant that
each appear in training (see `split_speakers`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from data_prep.recipes.voice_assistant import grammar

__all__ = ["CorpusError", "Utt", "estimate_seconds", "plan_corpus", "split_speakers"]

SPEED_RANGE = (115, 235)      # words per minute (espeak-ng -s)
PITCH_RANGE = (10, 90)        # espeak-ng -p, 0..99
WORD_GAP_RANGE = (0, 6)       # espeak-ng -g: extra pause between words, units of 10 ms
LEAD_SILENCE = (0.05, 0.25)   # seconds of padding before / after speech (after trimming espeak's own)
TRAIL_SILENCE = (0.05, 0.30)
PEAK_RANGE = (0.25, 0.90)     # output peak level, so loudness varies between utterances
NOISE_PROB = 0.6              # share of utterances that get white noise ...
SNR_RANGE_DB = (25.0, 45.0)   # ... at this signal-to-noise ratio
HELDOUT_FRAC = 0.10           # share of accent+variant pairs for dev, and again for test
# Seconds of speech per (character / wpm); calibrated on this grammar with espeak-ng 1.51.
SECONDS_PER_CHAR_WPM = 8.9
ESPEAK_OVERHEAD_S = 0.11     # what is left of espeak-ng's own silence after trim_silence()


class CorpusError(Exception):
    """The corpus cannot be made as asked; reported as one line on stderr with exit status 2."""


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


def estimate_seconds(text: str, speed: int, lead: float = 0.0, trail: float = 0.0, gap: int = 0) -> float:
    """Rough audio length, used only to pick how many training sentences reach --hours."""
    words_gap = 0.01 * gap * text.count(" ")
    return SECONDS_PER_CHAR_WPM * len(text) / speed + ESPEAK_OVERHEAD_S + lead + trail + words_gap


def _make_utt(index: int, split: str, n: int, text: str, speaker: str,
              rng: random.Random) -> Utt:
    return Utt(index=index, id=f"{split}_{n:06d}", split=split, text=text, speaker=speaker,
               speed=rng.randint(*SPEED_RANGE), pitch=rng.randint(*PITCH_RANGE),
               gap=rng.randint(*WORD_GAP_RANGE), lead=round(rng.uniform(*LEAD_SILENCE), 3),
               trail=round(rng.uniform(*TRAIL_SILENCE), 3),
               peak=round(rng.uniform(*PEAK_RANGE), 3),
               snr_db=round(rng.uniform(*SNR_RANGE_DB), 1) if rng.random() < NOISE_PROB
               else None)


def _speaker_cycle(speakers: list[str], rng: random.Random):
    """Round-robin over speakers in fresh shuffles, so every speaker gets a fair share."""
    while True:
        order = list(speakers)
        rng.shuffle(order)
        yield from order


def plan_corpus(speakers: dict[str, list[str]], hours: float, dev_utts: int, test_utts: int,
                seed: int, festival_utts: int = 0) -> list[Utt]:
    """Texts and voice settings for all utterances; dev/test/test_festival texts never occur in
    train. ``speakers["test_festival"]`` holds ``festival+<voice>`` ids."""
    text_rng = random.Random(f"text-{seed}")
    voice_rng = random.Random(f"voice-{seed}")
    stream = grammar.sentence_stream(text_rng)
    utts: list[Utt] = []
    heldout_texts: set[str] = set()
    for split, count in (("dev", dev_utts), ("test", test_utts), ("test_festival", festival_utts)):
        cycle = _speaker_cycle(speakers.get(split, []), voice_rng) if count else None
        for n in range(1, count + 1):
            text = next(stream)
            heldout_texts.add(text)
            utts.append(_make_utt(len(utts), split, n, text, next(cycle), voice_rng))
    cycle = _speaker_cycle(speakers["train"], voice_rng)
    budget, n = hours * 3600.0, 0
    while budget > 0:
        text = next(stream)
        if text in heldout_texts:   # only possible if the grammar ran out of new sentences
            continue
        n += 1
        utt = _make_utt(len(utts), "train", n, text, next(cycle), voice_rng)
        utts.append(utt)
        budget -= estimate_seconds(text, utt.speed, utt.lead, utt.trail, utt.gap)
    return utts
