"""LibriSpeech subset -> JSONL manifest.

    python -m hpc_asr prep librispeech --root /data --subset test-clean --out data/librispeech/test-clean.jsonl

``--root`` may be the folder holding ``LibriSpeech/``, ``LibriSpeech/`` itself, or the subset folder.
Each ``SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` line ``UTTID WORDS...`` becomes one utterance
with the ``.flac`` beside it. Lines without words, without audio or whose FLAC header cannot be read
(a truncated download) are skipped and named on stderr, so one bad chapter doesn't cost a whole
corpus download. A FLAC cut off after its header is only found by decoding it: ``data_prep.fbank``
rejects it and lists it in ``rejects.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpc_asr.data.manifest import Utterance, write_manifest
from hpc_asr.data.tokenizer import normalize


def subset_dir(root: Path, subset: str) -> Path:
    for d in (root / "LibriSpeech" / subset, root / subset, root):
        if d.is_dir() and any(d.glob("*/*/*.trans.txt")):
            return d
    raise FileNotFoundError(f"{root}: no {subset}/SPEAKER/CHAPTER/*.trans.txt found under it")


def read_subset(directory: Path) -> list[Utterance]:
    import soundfile as sf

    utts = []
    for trans in sorted(directory.glob("*/*/*.trans.txt")):
        speaker = trans.parent.parent.name
        # splitlines() copes with a missing final newline and with CRLF files.
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt_id, *words = line.split(maxsplit=1)
            text = normalize(words[0] if words else "")
            if not text:
                print(f"skipped {trans}:{lineno}: no transcript words", file=sys.stderr)
                continue
            flac = trans.parent / f"{utt_id}.flac"
            if not flac.is_file():
                print(f"skipped {utt_id}: {flac} not found", file=sys.stderr)
                continue
            try:
                duration = sf.info(str(flac)).duration
            except Exception as e:  # LibsndfileError/RuntimeError: a truncated or corrupt header
                print(f"skipped {utt_id}: {flac} unreadable ({str(e).splitlines()[0]})", file=sys.stderr)
                continue
            utts.append(Utterance(utt_id, str(flac.resolve()), text, round(duration, 4), speaker))
    return utts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, type=Path, help="folder holding LibriSpeech/, or a subset folder")
    p.add_argument("--subset", default="test-clean", help="e.g. train-clean-100, dev-clean, test-clean")
    p.add_argument("--out", required=True, type=Path, help="JSONL manifest to write")
    args = p.parse_args(argv)
    try:
        utts = read_subset(subset_dir(args.root, args.subset))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_manifest(args.out, utts)
    hours = sum(u.duration for u in utts) / 3600
    print(f"[librispeech] wrote {args.out}: {len(utts)} utterances, {hours:.2f} h", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
