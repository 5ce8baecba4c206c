"""RHVoice (Debian rhvoice, rhvoice-english): the statistical-parametric (HTS) voices bdl (male) and clb
(female) of the CMU ARCTIC recordings, one ``RHVoice-test`` process per utterance at 24 kHz.

Only these two: slt is the speaker of festival's HTS voice (the cross-engine test must stay unheard),
alan stays out, and evgeniy-eng and lyubov carry non-commercial licences.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from data_prep.recipes.voice_assistant.audio import parse_wav, run_synthesizer
from data_prep.recipes.voice_assistant.plan import EngineMissing, EngineVoices, Prosody, Utt, split_voices

__all__ = ["NAME", "PROSODY", "VOICES", "render", "splits", "voices"]

NAME = "rhvoice"
VOICES = ("bdl", "clb")
VOICE_DIR = Path("/usr/share/RHVoice/voices")
# rate and pitch in percent of the voice's own (RHVoice-test -r, -t; below 50 both stop changing)
PROSODY = Prosody(speed=(75, 150), pitch=(80, 125), nominal=100)
INSTALL = "apt-get install rhvoice rhvoice-english, from Debian non-free"


def voices() -> list[str]:
    """VOICES that are installed; none (or no RHVoice-test) raises EngineMissing."""
    if shutil.which("RHVoice-test") is None:
        raise EngineMissing(f"RHVoice-test not found on PATH ({INSTALL})")
    have = [v for v in VOICES if (VOICE_DIR / v).is_dir()]
    if not have:
        raise EngineMissing(f"neither RHVoice voice {' nor '.join(VOICES)} is installed ({INSTALL})")
    return have


def splits(seed: int) -> EngineVoices:
    return split_voices(NAME, voices(), seed)


def render(utt: Utt) -> tuple[np.ndarray, int]:
    """One utterance (text on stdin, WAV on stdout); (samples, rate), a failure raises."""
    return parse_wav(run_synthesizer(["RHVoice-test", "-p", utt.voice, "-r", str(utt.speed), "-t", str(utt.pitch),
                                      "-o", "-"], utt.text))
