"""MBROLA diphone voices driven by espeak-ng: us1, us2, us3 (American) and en1 (British), each the
recorded diphones of one real speaker.

espeak-ng turns the text into phonemes with durations and pitch (``--pho``, where the drawn rate,
pitch and word gap act), the phoneme names are fixed for the database, and ``mbrola`` concatenates
the diphones.  Going through ``--pho`` rather than ``espeak-ng -v mb-us3`` directly is what lets
the fix happen: espeak-ng's us3 table writes the LOT vowel ("on", "boston", "long", "calendar")
as ``O2``, a phoneme the us3 database lacks, so the default path replaces it with silence (on a
sample of this grammar PocketSphinx heard "boston" as "sentimental"; ``O2`` is in 1,330 of mbrola's
unknown-diphone warnings over 3,000 sentences). us3 has ``A`` ("arthur"), the American LOT vowel.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from data_prep.recipes.voice_assistant.audio import parse_wav, run_synthesizer
from data_prep.recipes.voice_assistant.plan import EngineMissing, EngineVoices, Prosody, Utt, split_voices

__all__ = ["NAME", "PHONEME_FIXES", "PROSODY", "VOICES", "database", "pho_fix", "render", "splits", "voices"]

NAME = "mbrola"
VOICES = ("us1", "us2", "us3", "en1")   # us1 female; us2, us3 and en1 (British) male
DATABASES = Path("/usr/share/mbrola")
# espeak-ng phoneme → the database's phoneme, per voice (see the module docstring)
PHONEME_FIXES = {"us3": {"O2": "A"}}
PROSODY = Prosody(speed=(120, 220), pitch=(20, 80), gap=(0, 4))
INSTALL = "apt-get install mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1, from Debian contrib/non-free"


def database(voice: str) -> Path:
    return DATABASES / voice / voice


def voices() -> list[str]:
    """VOICES whose database and espeak-ng voice are installed; none raises EngineMissing."""
    for tool in ("espeak-ng", "mbrola"):
        if shutil.which(tool) is None:
            raise EngineMissing(f"{tool} not found on PATH ({INSTALL})")
    listed = subprocess.run(["espeak-ng", "--voices=mb"], capture_output=True, text=True, check=False, timeout=60)
    have = [v for v in VOICES if database(v).is_file() and f"mb/mb-{v}" in listed.stdout.split()]
    if not have:
        raise EngineMissing(f"none of the MBROLA voices {', '.join(VOICES)} is installed ({INSTALL})")
    return have


def splits(seed: int) -> EngineVoices:
    return split_voices(NAME, voices(), seed)


def pho_fix(pho: str, voice: str) -> str:
    """Rename phonemes the voice's database lacks (the first, tab-separated field of each .pho line)."""
    fixes = PHONEME_FIXES.get(voice, {})
    if not fixes:
        return pho
    lines = []
    for line in pho.splitlines():
        name, tab, rest = line.partition("\t")   # "O2<TAB>50<TAB> 0 94 20 95 ..."
        lines.append(fixes.get(name, name) + tab + rest)
    return "\n".join(lines) + "\n"


def render(utt: Utt) -> tuple[np.ndarray, int]:
    """One utterance: espeak-ng --pho → `pho_fix` → mbrola; (samples, rate), a failure raises."""
    pho = run_synthesizer(["espeak-ng", "-v", f"mb-{utt.voice}", "-s", str(utt.speed), "-p", str(utt.pitch),
                           "-g", str(utt.gap), "-q", "--pho", utt.text]).decode()
    # -e: a diphone the database lacks (a handful, e.g. h-j) becomes a short silence instead of an abort
    wav = run_synthesizer(["mbrola", "-e", str(database(utt.voice)), "-", "-.wav"], pho_fix(pho, utt.voice))
    return parse_wav(wav)
