"""SVOX Pico through PyPI's py-nanotts (Apache-2.0): its en-US and en-GB voices ship in the wheel and
it synthesizes in-process at 16 kHz.  The binding wraps the text in Pico's ``<speed level>`` and
``<pitch level>`` tags from the multipliers given; the drawn values are percent of normal."""

from __future__ import annotations

import numpy as np

from data_prep.recipes.voice_assistant.plan import EngineMissing, EngineVoices, Prosody, Utt, split_voices

__all__ = ["NAME", "PROSODY", "VOICES", "render", "splits", "voices"]

NAME = "pico"
VOICES = ("en-US", "en-GB")
PROSODY = Prosody(speed=(75, 140), pitch=(80, 125), nominal=100)
SAMPLE_RATE = 16000   # what py-nanotts returns: mono 16-bit little-endian PCM


def _engine():
    try:
        import py_nanotts
    except ImportError:
        raise EngineMissing("py-nanotts is not installed (pip install py-nanotts, in env/requirements.txt)") \
            from None
    return py_nanotts.NanoTTS()


def voices() -> list[str]:
    _engine()
    return list(VOICES)


def splits(seed: int) -> EngineVoices:
    return split_voices(NAME, voices(), seed)


def render(utt: Utt) -> tuple[np.ndarray, int]:
    """One utterance, in this process (the binding holds the GIL: Pico runs at ~50× real time)."""
    pcm = _engine().speak(utt.text, voice=utt.voice, speed=utt.speed / 100, pitch=utt.pitch / 100)
    if not pcm:
        raise RuntimeError("py-nanotts returned no audio")
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, SAMPLE_RATE
