"""WER/CER as summable error counts, so ranks can all-reduce them before dividing."""

from __future__ import annotations

import jiwer

__all__ = ["error_counts", "rates"]


def error_counts(refs: list[str], hyps: list[str]) -> dict[str, int]:
    """Word and character edits plus reference lengths; empty references are counted, not skipped."""
    out = {"word_errors": 0, "words": 0, "char_errors": 0, "chars": 0}
    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if pairs:
        r, h = [p[0] for p in pairs], [p[1] for p in pairs]
        w = jiwer.process_words(r, h)
        c = jiwer.process_characters(r, h)
        out["word_errors"] = w.substitutions + w.deletions + w.insertions
        out["words"] = w.substitutions + w.deletions + w.hits
        out["char_errors"] = c.substitutions + c.deletions + c.insertions
        out["chars"] = c.substitutions + c.deletions + c.hits
    for ref, hyp in zip(refs, hyps):  # an empty reference: every hypothesis word is an insertion
        if not ref.strip():
            out["word_errors"] += len(hyp.split())
            out["char_errors"] += len(hyp)
    return out


def rates(counts: dict[str, int]) -> tuple[float, float]:
    """(WER, CER) as fractions."""
    return counts["word_errors"] / max(counts["words"], 1), counts["char_errors"] / max(counts["chars"], 1)
