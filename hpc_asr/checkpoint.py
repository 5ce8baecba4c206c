"""Checkpoints: atomic save (rank 0), strict load, safe deserialisation.

A checkpoint carries everything needed to rebuild and use the model without the training
config file: the full config, the tokenizer symbols and (inside the model buffers) the CMVN.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hpc_asr.config import Config
from hpc_asr.model import ConformerCTC
from hpc_asr.tokenizer import CharTokenizer

__all__ = ["CheckpointError", "load", "load_model", "save"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a job killed
    mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    """weights_only=True: a checkpoint cannot execute code when loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {state.get('format_version')}, expected {FORMAT_VERSION}")
    return state


def load_model(path: str | Path) -> tuple[ConformerCTC, CharTokenizer, Config]:
    """Rebuild the model exactly as trained (strict: every tensor must match) in eval mode."""
    state = load(path)
    cfg = Config.from_dict(state["config"], f"{path}: config")
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    return model, CharTokenizer.from_state_dict(state["tokenizer"]), cfg
