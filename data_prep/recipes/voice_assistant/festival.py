"""festival, the cross-synthesizer test engine: diphone and HTS voices, one process per batch of
utterances.  Only the test_festival split uses it: no festival audio is ever trained on."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from data_prep.recipes.voice_assistant.audio import finish
from data_prep.recipes.voice_assistant.plan import CorpusError, Utt

__all__ = ["FESTIVAL_VOICES", "festival_script", "festival_voices", "synthesize_festival"]

# festival voices for the cross-synthesizer test (Debian festvox-kallpc16k, festvox-kdlpc16k,
# festvox-us-slt-hts); those not installed are skipped, none at all is an error.
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
STRETCH_RANGE = (0.85, 1.2)   # festival Duration_Stretch (diphone voices)
FESTIVAL_BATCH = 25           # utterances per festival process (start-up costs ~0.3 s)
FESTIVAL_TIMEOUT_S = 300


def festival_script(utts: list[Utt], wav_dir: Path) -> str:
    """A festival (Scheme) batch script rendering ``utts`` to ``wav_dir/<id>.wav``; the espeak
    speed drawn for each utterance becomes a duration stretch (diphone voices honour it)."""
    lines = []
    for u in utts:
        stretch = min(max(165 / u.speed, STRETCH_RANGE[0]), STRETCH_RANGE[1])
        lines += [f"(voice_{u.speaker.split('+', 1)[1]})",
                  f"(Parameter.set 'Duration_Stretch {stretch:.3f})",
                  f'(utt.save.wave (utt.synth (Utterance Text "{u.text}")) "{wav_dir / u.id}.wav" \'riff)']
    return "\n".join(lines) + "\n"


def synthesize_festival(utts: list[Utt], out: Path, seed: int) -> list[dict]:
    """Render a batch with one festival process; rows as `synthesize` returns them."""
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
            rows.append(finish(u, wav.read_bytes(), out, seed) if wav.is_file() else
                        {"id": u.id, "split": u.split, "error": f"festival wrote no audio {problem}".strip()})
        return rows


def festival_voices() -> list[str]:
    """FESTIVAL_VOICES that this festival installation has."""
    if shutil.which("festival") is None:
        raise CorpusError("festival not found on PATH for the test_festival split (apt-get install festival "
                       "festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts), or pass --festival-utts 0")
    res = subprocess.run(["festival", "-b", "(begin (print (voice.list)))"], capture_output=True, text=True,
                         check=False, timeout=FESTIVAL_TIMEOUT_S // 5)
    have = set(res.stdout.replace("(", " ").replace(")", " ").split())
    voices = [v for v in FESTIVAL_VOICES if v in have]
    if not voices:
        raise CorpusError(f"festival has none of the voices {FESTIVAL_VOICES} (apt-get install festvox-kallpc16k)")
    return voices
