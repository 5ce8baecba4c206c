"""Transcript normalisation, the one definition every part uses (corpus grammar, LibriSpeech and
other readers, tokenizers, the LM, scoring): lower-case, anything outside ``[a-z' ]`` becomes a
word break, spaces collapse. "Twenty-five" → "twenty five", not "twentyfive"."""

from __future__ import annotations

import re

__all__ = ["CHARSET", "normalize"]

CHARSET = "abcdefghijklmnopqrstuvwxyz' "
_BAD_CHARS = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r" +")


def normalize(text: str) -> str:
    """Lower-case, map anything outside [a-z' ] to a space, collapse and strip spaces."""
    return _SPACES.sub(" ", _BAD_CHARS.sub(" ", text.lower())).strip()
