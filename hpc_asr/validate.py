"""The rules a config value must meet, and the error that names the one it broke: every section of
``hpc_asr.config`` and every option of ``hpc-asr jobs`` is checked here, so a bad value reads the
same wherever it comes from (``section.key must be > 0, got -2``)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

__all__ = ["ConfigError", "validate"]


class ConfigError(ValueError):
    """A config file or override names an unknown key or carries a bad value."""


_RANGES = {
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, ">= 0"),
    ">=1": (lambda v: v >= 1, ">= 1"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def validate(obj: Any, section: str, **rules: str | tuple[str, ...]) -> None:
    """Check every field's type (floats must be finite) and each ``key=rule``: a range from
    ``_RANGES`` or a tuple of allowed strings. The message names ``section.key`` and the value."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, typ = getattr(obj, f.name), hints[f.name]
        ok = (isinstance(v, typ) and not (typ is int and isinstance(v, bool))) if typ in (bool, int, str) else (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if typ is float else True)
        if not ok:
            raise ConfigError(f"{section}.{f.name} must be a finite {typ.__name__}, got {v!r}")
    for key, rule in rules.items():
        v = getattr(obj, key)
        if isinstance(rule, tuple):
            if v not in rule:
                raise ConfigError(f"{section}.{key} must be one of {'|'.join(rule)}, got {v!r}")
            continue
        check, text = _RANGES[rule]
        if not check(v):
            raise ConfigError(f"{section}.{key} must be {text}, got {v!r}")
