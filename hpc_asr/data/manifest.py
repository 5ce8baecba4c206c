"""JSONL manifests: one utterance per line with ``id``, ``audio``, ``duration``, ``text``, ``speaker``, and for
synthetic speech ``engine`` and ``voice`` (the synthesizer and its voice; omitted when empty).

``audio`` may be absolute or relative to the manifest's directory. Every corpus reader in
``data_prep/`` writes this format, so the feature pipeline has a single input.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from hpc_asr.atomic import atomic_path

__all__ = ["ManifestError", "Utterance", "read_manifest", "write_manifest"]

REQUIRED = ("id", "audio", "text")
_OPTIONAL = ("engine", "voice")  # written only when set, so recorded corpora keep their five fields


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file and line."""


@dataclass
class Utterance:
    id: str
    audio: str
    text: str
    duration: float = 0.0
    speaker: str = ""
    engine: str = ""  # the speech synthesizer that made the audio ("espeak", "mbrola", ...); "" for recordings
    voice: str = ""   # that synthesizer's voice ("en-us+m1", "us3", "bdl", ...)


def read_manifest(path: str | Path) -> list[Utterance]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base = path.resolve().parent
    utts, seen = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ManifestError(f"{path}:{lineno}: not JSON ({e})") from None
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ManifestError(f"{path}:{lineno}: missing field(s) {missing}")
        if row["id"] in seen:
            raise ManifestError(f"{path}:{lineno}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        audio = Path(row["audio"])
        utts.append(
            Utterance(
                id=str(row["id"]),
                audio=str(audio if audio.is_absolute() else base / audio),
                text=str(row["text"]),
                duration=float(row.get("duration", 0.0)),
                speaker=str(row.get("speaker", "")),
                engine=str(row.get("engine", "")),
                voice=str(row.get("voice", "")),
            )
        )
    return utts


def write_manifest(path: str | Path, utts: list[Utterance]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for u in utts:
            row = {k: v for k, v in asdict(u).items() if v != "" or k not in _OPTIONAL}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
