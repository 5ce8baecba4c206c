"""Character vocabulary for CTC. Index 0 is the blank; the symbol list travels in checkpoints."""

from __future__ import annotations

import re

__all__ = ["CharTokenizer", "normalize"]

DEFAULT_SYMBOLS = list(" 'abcdefghijklmnopqrstuvwxyz")


def normalize(text: str) -> str:
    """Lower-case, keep letters, apostrophes and single spaces (LibriSpeech and VA transcripts)."""
    return re.sub(r" +", " ", re.sub(r"[^a-z' ]", " ", text.lower())).strip()


class CharTokenizer:
    blank = 0

    def __init__(self, symbols: list[str] | None = None):
        self.symbols = list(symbols or DEFAULT_SYMBOLS)
        if len(set(self.symbols)) != len(self.symbols) or any(len(s) != 1 for s in self.symbols):
            raise ValueError(f"tokenizer symbols must be distinct single characters, got {self.symbols}")
        self._ids = {s: i + 1 for i, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols) + 1

    def encode(self, text: str) -> list[int]:
        """Characters outside the vocabulary are dropped after normalisation."""
        return [self._ids[c] for c in normalize(text) if c in self._ids]

    def decode(self, ids) -> str:
        return "".join(self.symbols[i - 1] for i in ids if 0 < i <= len(self.symbols)).strip()

    def state_dict(self) -> dict:
        return {"type": "char", "symbols": self.symbols}

    @classmethod
    def from_state_dict(cls, state: dict) -> CharTokenizer:
        if state.get("type") != "char":
            raise ValueError(f"unknown tokenizer type {state.get('type')!r}")
        return cls(state["symbols"])
