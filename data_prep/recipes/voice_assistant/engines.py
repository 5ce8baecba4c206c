"""The speech engines of the corpus, by name: which may speak training audio, which are installed,
and one utterance rendered by the engine the plan gave it.

Training engines: espeak-ng (formant), MBROLA (diphones of four real speakers, driven by espeak-ng),
SVOX Pico and RHVoice (bdl, clb).  festival is never one of them: it speaks only the festival
test/dev splits, so those measure an engine the model never heard.  Every engine is optional at
generation time: a missing one is one line on stderr, and the corpus is made from the others
(``--require-engines`` makes it an error instead).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.recipes.voice_assistant import espeak, festival, mbrola, pico, rhvoice
from data_prep.recipes.voice_assistant.audio import finish
from data_prep.recipes.voice_assistant.plan import EngineMissing, EngineVoices, Prosody, Utt

__all__ = ["DEFAULT_ENGINES", "TRAINING_ENGINES", "find_voices", "parse_engines", "prosody", "synthesize"]

_MODULES = {m.NAME: m for m in (espeak, mbrola, pico, rhvoice)}
TRAINING_ENGINES = tuple(_MODULES)
DEFAULT_ENGINES = ("espeak",)   # what `make demo` uses until the ablation (docs/accuracy.md) says more


def parse_engines(spec: str) -> dict[str, int]:
    """``"espeak:2,mbrola"`` → {"espeak": 2, "mbrola": 1}: the training engines and their shares of
    the training utterances (weight 1 when not given); an unknown name, festival or a bad weight
    raises ValueError."""
    weights: dict[str, int] = {}
    for item in (n.strip() for n in spec.split(",")):
        if not item:
            continue
        name, _, w = item.partition(":")
        if name == "festival":
            raise ValueError("festival never speaks training audio (it is the cross-engine test); "
                             f"choose from {','.join(TRAINING_ENGINES)}")
        if name not in _MODULES:
            raise ValueError(f"unknown engine {name!r}: choose from {','.join(TRAINING_ENGINES)}")
        if name in weights:
            raise ValueError(f"engine {name} named twice")
        if w and not (w.isdigit() and int(w) >= 1):
            raise ValueError(f"{item!r}: the weight after ':' must be a whole number >= 1")
        weights[name] = int(w) if w else 1
    if not weights:
        raise ValueError(f"no engine in {spec!r}: choose from {','.join(TRAINING_ENGINES)}")
    return weights


def find_voices(names: list[str], seed: int, festival_wanted: bool,
                require: bool = False) -> tuple[dict[str, EngineVoices], list[str]]:
    """Each named engine's voices per split (and festival's if wanted), and one line per engine that is
    missing.  A missing festival, a missing engine under ``require``, or no training engine left
    raises EngineMissing."""
    voices: dict[str, EngineVoices] = {}
    problems: dict[str, str] = {}
    for name in names:
        try:
            voices[name] = _MODULES[name].splits(seed)
        except EngineMissing as exc:
            if require:
                raise EngineMissing(f"engine {name}: {exc}") from None
            problems[name] = str(exc)
    if not voices:
        raise EngineMissing("; ".join(f"engine {n}: {p}" for n, p in problems.items()))
    if festival_wanted:
        voices[festival.NAME] = festival.splits(seed)
    return voices, [f"skipping engine {n}: {p}" for n, p in problems.items()]


def prosody(names: list[str]) -> dict[str, Prosody]:
    """Draw ranges per engine, festival's included."""
    return {**{n: _MODULES[n].PROSODY for n in names}, festival.NAME: festival.PROSODY}


def synthesize(utt: Utt, out: Path, seed: int) -> dict:
    """Render one utterance with its engine; a manifest row, or {"id", "split", "error"} instead of raising."""
    try:
        x, rate = _MODULES[utt.engine].render(utt)
    except Exception as exc:
        return {"id": utt.id, "split": utt.split, "error": f"{utt.engine}: {type(exc).__name__}: {exc}"}
    return finish(utt, x, rate, out, seed)

