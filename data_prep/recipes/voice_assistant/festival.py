"""festival, the cross-synthesizer test engine: diphone and HTS voices, one process per batch of
utterances.  Only the test_festival and dev_festival splits use it (dev_festival only for choosing
settings): no festival audio, voice or front end is ever trained on."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from data_prep.recipes.voice_assistant.audio import finish, parse_wav
from data_prep.recipes.voice_assistant.plan import EngineMissing, EngineVoices, Prosody, Utt

__all__ = ["FESTIVAL_VOICES", "NAME", "PROSODY", "SPLITS", "festival_script", "festival_voices", "splits",
           "synthesize_festival"]

NAME = "festival"
SPLITS = ("test_festival", "dev_festival")
# English voices Debian packages (festvox-kallpc16k, -kdlpc16k, -rablpc16k, -us-slt-hts); those not
# installed are skipped, none at all is an error.  Left out: festvox-don (a minimal 10 kHz voice),
# the 8 kHz kal/kdl/rab copies, and festvox-us1/us2/us3/en1 (MBROLA voices the training speaks).
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "rab_diphone", "cmu_us_slt_arctic_hts")
# The speed drawn (espeak-ng words a minute) becomes a duration stretch; pitch is not used.
PROSODY = Prosody(speed=(115, 235), pitch=(10, 90))
STRETCH_RANGE = (0.85, 1.2)   # festival Duration_Stretch (diphone voices)
FESTIVAL_BATCH = 25           # utterances per festival process (start-up costs ~0.3 s)
FESTIVAL_TIMEOUT_S = 300
INSTALL = "apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-rablpc16k festvox-us-slt-hts"


def festival_voices() -> list[str]:
    """FESTIVAL_VOICES that this festival installation has."""
    if shutil.which("festival") is None:
        raise EngineMissing(f"festival not found on PATH for the festival splits ({INSTALL}), "
                            "or pass --festival-utts 0 --festival-dev-utts 0")
    res = subprocess.run(["festival", "-b", "(begin (print (voice.list)))"], capture_output=True, text=True,
                         check=False, timeout=60)
    have = set(res.stdout.replace("(", " ").replace(")", " ").split())
    voices = [v for v in FESTIVAL_VOICES if v in have]
    if not voices:
        raise EngineMissing(f"festival has none of the voices {', '.join(FESTIVAL_VOICES)} ({INSTALL})")
    return voices


def splits(seed: int) -> EngineVoices:
    """Every installed voice speaks both festival splits (their sentences differ)."""
    voices = festival_voices()
    return {split: list(voices) for split in SPLITS}


def festival_script(utts: list[Utt], wav_dir: Path) -> str:
    """A festival (Scheme) batch script rendering ``utts`` to ``wav_dir/<id>.wav``; the espeak
    speed drawn for each utterance becomes a duration stretch (diphone voices honour it)."""
    lines = []
    for u in utts:
        stretch = min(max(165 / u.speed, STRETCH_RANGE[0]), STRETCH_RANGE[1])
        lines += [f"(voice_{u.voice})",
                  f"(Parameter.set 'Duration_Stretch {stretch:.3f})",
                  f'(utt.save.wave (utt.synth (Utterance Text "{u.text}")) "{wav_dir / u.id}.wav" \'riff)']
    return "\n".join(lines) + "\n"


def synthesize_festival(utts: list[Utt], out: Path, seed: int) -> list[dict]:
    """Render a batch with one festival process; manifest rows or {"id", "split", "error"}."""
    with tempfile.TemporaryDirectory(prefix="festival-") as tmp:
        script = Path(tmp) / "batch.scm"
        script.write_text(festival_script(utts, Path(tmp)))
        try:
            res = subprocess.run(["festival", "-b", str(script)], capture_output=True, check=False,
                                 stdin=subprocess.DEVNULL, timeout=FESTIVAL_TIMEOUT_S)
            problem = res.stderr.decode(errors="replace").strip()[:200] if res.returncode else ""
        except subprocess.TimeoutExpired:
            problem = "festival timed out"
        rows = []
        for u in utts:
            wav = Path(tmp) / f"{u.id}.wav"
            try:
                x, rate = parse_wav(wav.read_bytes())
            except (OSError, ValueError) as exc:
                error = f"festival wrote no audio ({exc}) {problem}".strip()
                rows.append({"id": u.id, "split": u.split, "error": error})
                continue
            rows.append(finish(u, x, rate, out, seed))
        return rows
