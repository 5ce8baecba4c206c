"""Greedy CTC decoding: best label per frame, merge repeats, drop blanks."""

from __future__ import annotations

import numpy as np

__all__ = ["greedy_batch", "greedy_ids"]


def greedy_ids(log_probs: np.ndarray, length: int, blank: int = 0) -> list[int]:
    """(T, V) scores of one utterance → label ids."""
    best = np.asarray(log_probs[:length]).argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(i) for i in best[keep] if i != blank]


def greedy_batch(log_probs, lengths, tokenizer) -> list[str]:
    """(B, T, V) scores (torch or numpy) + (B,) lengths → transcripts."""
    lp = log_probs.detach().cpu().numpy() if hasattr(log_probs, "detach") else np.asarray(log_probs)
    ln = lengths.detach().cpu().numpy() if hasattr(lengths, "detach") else np.asarray(lengths)
    return [tokenizer.decode(greedy_ids(lp[b], int(ln[b]), tokenizer.blank)) for b in range(lp.shape[0])]
