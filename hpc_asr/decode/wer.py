"""WER/CER as summable error counts, so ranks can all-reduce them before dividing; the most
frequent word errors for reading what a model gets wrong."""

from __future__ import annotations

from collections import Counter

import jiwer

__all__ = ["COUNT_KEYS", "error_counts", "frequent_errors", "rates"]

COUNT_KEYS = ("word_errors", "words", "substitutions", "deletions", "insertions", "char_errors", "chars")


def error_counts(refs: list[str], hyps: list[str]) -> dict[str, int]:
    """Word edits (split into substitutions, deletions, insertions), character edits and the
    reference lengths; empty references are counted, not skipped."""
    out = dict.fromkeys(COUNT_KEYS, 0)
    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if pairs:
        r, h = [p[0] for p in pairs], [p[1] for p in pairs]
        w = jiwer.process_words(r, h)
        c = jiwer.process_characters(r, h)
        out.update(substitutions=w.substitutions, deletions=w.deletions, insertions=w.insertions)
        out["word_errors"] = w.substitutions + w.deletions + w.insertions
        out["words"] = w.substitutions + w.deletions + w.hits
        out["char_errors"] = c.substitutions + c.deletions + c.insertions
        out["chars"] = c.substitutions + c.deletions + c.hits
    for ref, hyp in zip(refs, hyps):  # an empty reference: every hypothesis word is an insertion
        if not ref.strip():
            out["word_errors"] += len(hyp.split())
            out["insertions"] += len(hyp.split())
            out["char_errors"] += len(hyp)
    return out


def frequent_errors(refs: list[str], hyps: list[str], top: int = 20) -> list[dict]:
    """The ``top`` most frequent word errors as {"ref", "hyp", "count"}: a substitution has both
    words, a deletion an empty ``hyp``, an insertion an empty ``ref``."""
    errors: Counter = Counter()
    for r, h in zip(refs, hyps):
        if not r.strip():
            errors.update(("", hw) for hw in h.split())
    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if not pairs:
        return [{"ref": r, "hyp": h, "count": n} for (r, h), n in errors.most_common(top)]
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    for ref, hyp, chunks in zip(out.references, out.hypotheses, out.alignments):
        for ch in chunks:
            if ch.type == "equal":
                continue
            r = " ".join(ref[ch.ref_start_idx : ch.ref_end_idx])
            h = " ".join(hyp[ch.hyp_start_idx : ch.hyp_end_idx])
            if ch.type == "substitute":  # word by word: a 2-word substitution is 2 errors
                for rw, hw in zip(r.split(), h.split()):
                    errors[(rw, hw)] += 1
            elif ch.type == "delete":
                errors.update((rw, "") for rw in r.split())
            else:
                errors.update(("", hw) for hw in h.split())
    return [{"ref": r, "hyp": h, "count": n} for (r, h), n in errors.most_common(top)]


def rates(counts: dict[str, int]) -> tuple[float, float]:
    """(WER, CER) as fractions."""
    return counts["word_errors"] / max(counts["words"], 1), counts["char_errors"] / max(counts["chars"], 1)
