"""Generic corpus lists -> the JSONL manifest that ``data_prep.fbank`` reads.

    python -m hpc_asr prep manifest tsv   --list corpus.tsv   --out data/x/train.jsonl
    python -m hpc_asr prep manifest kaldi --dir data/train    --out data/x/train.jsonl

- ``tsv``: one utterance per line, ``path<TAB>text[<TAB>speaker]`` (a ``.csv`` file uses commas and
  CSV quoting). Relative paths are relative to the list's folder; a first line ``path ...`` is a
  header. The id is the file name without extension (its relative path when names repeat).
- ``kaldi``: a Kaldi data dir: ``wav.scp`` (``ID PATH`` or ``ID COMMAND |``), ``text``, and
  optionally ``utt2spk`` and ``segments`` (``UTT REC START END``). Piped commands and segments are
  decoded here, once, into WAV files under ``--audio-dir`` (default: ``<out>.audio/``), so the
  feature prep reads plain files.

Lines whose audio is missing or unreadable, or whose transcript is empty, are skipped and named on
stderr (one line each), as in ``data_prep.recipes.librispeech``. Texts are normalized as the tokenizer
expects.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from hpc_asr.atomic import atomic_path
from hpc_asr.data.manifest import ManifestError, Utterance, write_manifest
from hpc_asr.data.tokenizer import normalize

__all__ = ["read_kaldi_dir", "read_list"]


def _skip(where: str, why: str) -> None:
    print(f"skipped {where}: {why}", file=sys.stderr)


def _duration(path: Path) -> float | None:
    import soundfile as sf

    try:
        return round(sf.info(str(path)).duration, 4)
    except Exception as e:  # LibsndfileError/RuntimeError: missing, truncated or not audio
        _skip(str(path), f"unreadable ({' '.join(str(e).split())[:200]})")
        return None


def _rows(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return [r for r in csv.reader(io.StringIO(text))]
    return [line.split("\t") for line in text.splitlines()]


def read_list(path: str | Path) -> list[Utterance]:
    """A TSV/CSV list ``path, text[, speaker]`` -> utterances (bad lines skipped and named)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: list not found")
    base, rows = path.resolve().parent, []
    for lineno, row in enumerate(_rows(path), 1):
        if not row or not "".join(row).strip() or (lineno == 1 and row[0].strip().lower() == "path"):
            continue
        if len(row) < 2:
            raise ManifestError(f"{path}:{lineno}: expected path, text[, speaker]; got {len(row)} field(s)")
        audio = Path(row[0].strip())
        speaker = row[2].strip() if len(row) > 2 else ""
        rows.append((lineno, audio if audio.is_absolute() else base / audio, row[1], speaker))
    stems = Counter(a.stem for _, a, _, _ in rows)
    utts = []
    for lineno, audio, words, speaker in rows:
        text = normalize(words)
        if not text:
            _skip(f"{path}:{lineno}", "no transcript words")
            continue
        duration = _duration(audio)
        if duration is None:
            continue
        unique = stems[audio.stem] == 1
        utt_id = audio.stem if unique else str(audio.relative_to(base).with_suffix("")).replace("/", "-")
        utts.append(Utterance(utt_id, str(audio.resolve()), text, duration, speaker))
    return utts


def _kv(path: Path, required: bool = True) -> dict[str, str]:
    """``KEY VALUE...`` lines of a Kaldi table."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: missing (a Kaldi data dir needs wav.scp and text)")
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, *rest = line.strip().split(maxsplit=1)
        out[key] = rest[0] if rest else ""
    return out


def _load_wav_scp_entry(entry: str) -> tuple[np.ndarray, int]:
    """Decode a wav.scp value: a path, or a shell command ending in ``|`` that writes audio."""
    import soundfile as sf

    if entry.endswith("|"):
        proc = subprocess.run(entry[:-1], shell=True, capture_output=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"command exited {proc.returncode}: {proc.stderr.decode(errors='replace')[:200]}")
        return sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return sf.read(entry, dtype="float32")


def _materialize(rec: str, entry: str, audio_dir: Path, cache: dict) -> tuple[np.ndarray, int] | None:
    if rec not in cache:
        try:
            cache.clear()  # segments come grouped by recording: keep one decoded recording
            cache[rec] = _load_wav_scp_entry(entry)
        except Exception as e:  # decode errors of many kinds; named and skipped
            _skip(rec, f"cannot read wav.scp entry {entry!r} ({' '.join(str(e).split())[:200]})")
            cache[rec] = None
    return cache[rec]


def _write_wav(path: Path, data: np.ndarray, sr: int) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a rerun killed mid-write never leaves a half WAV an old manifest lists
        sf.write(str(tmp), data, sr, subtype="PCM_16", format="WAV")


def read_kaldi_dir(directory: str | Path, audio_dir: str | Path) -> list[Utterance]:
    """A Kaldi data dir -> utterances; piped and segmented audio is written to ``audio_dir``."""
    d, audio_dir = Path(directory), Path(audio_dir)
    wav, text = _kv(d / "wav.scp"), _kv(d / "text")
    spk, segments = _kv(d / "utt2spk", False), _kv(d / "segments", False)
    cache: dict = {}
    utts = []
    for utt_id in sorted(text):
        words = normalize(text[utt_id])
        if not words:
            _skip(utt_id, "no transcript words")
            continue
        rec, span = (segments[utt_id].split()[0], segments[utt_id].split()[1:]) if segments else (utt_id, None)
        if rec not in wav:
            _skip(utt_id, f"recording {rec} not in wav.scp")
            continue
        entry = wav[rec].strip()
        if span is None and not entry.endswith("|"):
            path = Path(entry) if Path(entry).is_absolute() else d / entry
            duration = _duration(path)
            if duration is not None:
                utts.append(Utterance(utt_id, str(path.resolve()), words, duration, spk.get(utt_id, "")))
            continue
        decoded = _materialize(rec, entry, audio_dir, cache)
        if decoded is None:
            continue
        data, sr = decoded
        if span is not None:
            start, end = float(span[0]), float(span[1])
            data = data[int(start * sr) : len(data) if end < 0 else int(end * sr)]
        if len(data) == 0:
            _skip(utt_id, "empty segment")
            continue
        out = audio_dir / f"{utt_id}.wav"
        _write_wav(out, data, sr)
        utts.append(Utterance(utt_id, str(out.resolve()), words, round(len(data) / sr, 4), spk.get(utt_id, "")))
    return utts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("tsv", help="path<TAB>text[<TAB>speaker] list (.csv: comma separated)")
    t.add_argument("--list", required=True, type=Path)
    k = sub.add_parser("kaldi", help="Kaldi data dir: wav.scp, text [, utt2spk, segments]")
    k.add_argument("--dir", required=True, type=Path)
    k.add_argument("--audio-dir", type=Path, help="where piped/segmented audio is written")
    for s in (t, k):
        s.add_argument("--out", required=True, type=Path, help="JSONL manifest to write")
    args = p.parse_args(argv)
    try:
        if args.kind == "tsv":
            utts = read_list(args.list)
        else:
            utts = read_kaldi_dir(args.dir, args.audio_dir or args.out.with_suffix(".audio"))
    except (FileNotFoundError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not utts:
        print(f"error: no usable utterance found for {args.out}; see the skipped lines above", file=sys.stderr)
        return 2
    write_manifest(args.out, utts)
    hours = sum(u.duration for u in utts) / 3600
    print(f"[readers] wrote {args.out}: {len(utts)} utterances, {hours:.2f} h", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
