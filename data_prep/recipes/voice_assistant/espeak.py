"""espeak-ng, the formant engine: its English voices (accents), voice variants, and one process per
utterance."""

from __future__ import annotations

import subprocess
from pathlib import Path

from data_prep.recipes.voice_assistant.audio import finish
from data_prep.recipes.voice_assistant.plan import CorpusError, Utt

__all__ = ["ACCENTS", "VARIANTS", "available_voices", "espeak_command", "synthesize"]

# Every English espeak-ng voice (accent).  MBROLA voices (en-uk, us-mbrola-*, en-german-*...)
# are left out: they need extra packages and ignore variants.  Missing ones are dropped at run
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
ESPEAK_TIMEOUT_S = 60


def _espeak_list(kind: str) -> str:
    res = subprocess.run(["espeak-ng", f"--voices={kind}"], capture_output=True, text=True,
                         check=False, timeout=ESPEAK_TIMEOUT_S)
    if res.returncode != 0:
        raise CorpusError(f"espeak-ng --voices={kind} failed: {res.stderr.strip()}")
    return res.stdout


def available_voices() -> tuple[list[str], list[str]]:
    """ACCENTS and VARIANTS that this espeak-ng installation actually has."""
    accent_rows = [line.split() for line in _espeak_list("en").splitlines()[1:]]
    langs = {row[1] for row in accent_rows if len(row) > 4 and not row[4].startswith("mb/")}
    files = {row[-1].split("/")[-1].lower() for row in
             (line.split() for line in _espeak_list("variant").splitlines()[1:]) if row}
    accents = [a for a in ACCENTS if a in langs]
    variants = [v for v in VARIANTS if v.lower() in files]
    if not accents or not variants:
        raise CorpusError("espeak-ng has no usable English voices or variants")
    return accents, variants



def espeak_command(utt: Utt) -> list[str]:
    accent, variant = utt.speaker.split("+", 1)
    return ["espeak-ng", "-v", f"{accent}+{variant}", "-s", str(utt.speed),
            "-p", str(utt.pitch), "-g", str(utt.gap), "--stdout", utt.text]



def synthesize(utt: Utt, out: Path, seed: int) -> dict:
    """Render one utterance with espeak-ng; returns a manifest row or {"id", "error"}."""
    try:
        res = subprocess.run(espeak_command(utt), capture_output=True, check=False,
                             stdin=subprocess.DEVNULL, timeout=ESPEAK_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"espeak-ng exit {res.returncode}: "
                               f"{res.stderr.decode(errors='replace').strip()[:200]}")
    except Exception as exc:
        return {"id": utt.id, "split": utt.split, "error": f"{type(exc).__name__}: {exc}"}
    return finish(utt, res.stdout, out, seed)
