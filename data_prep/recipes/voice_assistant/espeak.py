"""espeak-ng, the formant engine: every English voice (accent) × voice variant, one process per
utterance."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

from data_prep.recipes.voice_assistant.audio import parse_wav, run_synthesizer
from data_prep.recipes.voice_assistant.plan import EngineMissing, EngineVoices, Prosody, Utt, split_speakers

__all__ = ["ACCENTS", "NAME", "PROSODY", "VARIANTS", "available_voices", "espeak_command", "render", "splits"]

NAME = "espeak"
# Every English espeak-ng voice (accent).  MBROLA voices (en-uk, us-mbrola-*, en-german-*...)
# are left out here: the `mbrola` engine drives four of them.  Missing ones are dropped at run
# time.
ACCENTS = ("en-us", "en-us-nyc", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-029")
# Every espeak-ng voice variant (file names) except those that stop sounding like speech:
# whisper, croak, the robots (robosoft*, UniRobot, anikaRobot), Demonic, the announcer echo,
# the RicishayMax/Tweaky squeaks and fast_test.  The six Klatt synthesizer variants are in.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
            "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "antonio", "aunty",
            "belinda", "benjamin", "boris", "caleb", "david", "Denis", "Diogo", "ed", "edward",
            "edward2", "Gene", "Gene2", "grandma", "grandpa", "gustave", "Henrique", "Hugo", "iven",
            "iven2", "iven3", "iven4", "Jacky", "john", "kaukovalta", "Lee", "linda", "marcelo",
            "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "Mr", "Nguyen", "norbert",
            "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph",
            "steph2", "steph3", "Storm", "travis", "victor", "zac", "anika")
# words a minute (-s), pitch 0..99 (-p), extra pause between words in 10 ms (-g)
PROSODY = Prosody(speed=(115, 235), pitch=(10, 90), gap=(0, 6))
_LIST_TIMEOUT_S = 60


def _espeak_list(kind: str) -> str:
    res = subprocess.run(["espeak-ng", f"--voices={kind}"], capture_output=True, text=True,
                         check=False, timeout=_LIST_TIMEOUT_S)
    if res.returncode != 0:
        raise EngineMissing(f"espeak-ng --voices={kind} failed: {res.stderr.strip()}")
    return res.stdout


def available_voices() -> tuple[list[str], list[str]]:
    """ACCENTS and VARIANTS that this espeak-ng installation actually has."""
    if shutil.which("espeak-ng") is None:
        raise EngineMissing("espeak-ng not found on PATH (apt-get install espeak-ng)")
    accent_rows = [line.split() for line in _espeak_list("en").splitlines()[1:]]
    langs = {row[1] for row in accent_rows if len(row) > 4 and not row[4].startswith("mb/")}
    files = {row[-1].split("/")[-1].lower() for row in
             (line.split() for line in _espeak_list("variant").splitlines()[1:]) if row}
    accents = [a for a in ACCENTS if a in langs]
    variants = [v for v in VARIANTS if v.lower() in files]
    if not accents or not variants:
        raise EngineMissing("espeak-ng has no usable English voices or variants")
    return accents, variants


def splits(seed: int) -> EngineVoices:
    """accent+variant pairs per split: dev and test get new combinations (`split_speakers`)."""
    return split_speakers(*available_voices(), seed)


def espeak_command(utt: Utt) -> list[str]:
    return ["espeak-ng", "-v", utt.voice, "-s", str(utt.speed), "-p", str(utt.pitch), "-g", str(utt.gap),
            "--stdout", utt.text]


def render(utt: Utt) -> tuple[np.ndarray, int]:
    """One utterance: (samples in [-1, 1], sample rate); a failure raises."""
    return parse_wav(run_synthesizer(espeak_command(utt)))
