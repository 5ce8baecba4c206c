"""Checkpoints: atomic save (rank 0), strict load, safe deserialisation, weight averaging.

A checkpoint carries everything needed to rebuild and use the model without the training
config file: the full config, the tokenizer (character symbols or the BPE model proto) and
(inside the model buffers) the CMVN.

    python -m hpc_asr checkpoint average --out avg.pt runs/x/step-00001000.pt runs/x/step-00002000.pt
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from hpc_asr.atomic import atomic_path
from hpc_asr.config import Config
from hpc_asr.data.tokenizer import from_state_dict as tokenizer_from_state
from hpc_asr.model import ConformerCTC

__all__ = ["CheckpointError", "average", "copy", "load", "load_model", "main", "save"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a job killed
    mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)


def load(path: str | Path) -> dict[str, Any]:
    """weights_only=True: a checkpoint cannot execute code when loaded. Anything that is not one
    of ours (a pickled model, another torch file, a text file) is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    try:
        state = torch.load(path, map_location="cpu", weights_only=True) if is_zip else None
    except pickle.UnpicklingError:  # weights_only refused an object: e.g. torch.save(model)
        state = None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"not an hpc_asr checkpoint: {path}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {state['format_version']}, expected {FORMAT_VERSION}")
    return state


def copy(src: str | Path, dst: str | Path) -> None:
    """``dst`` becomes a snapshot of ``src`` (a hard link when possible: ``save`` replaces
    files by rename, so the link keeps the old contents), atomically."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def average(paths: list[str | Path]) -> dict[str, Any]:
    """Element-wise mean of the models in ``paths`` (floating tensors; integer buffers such as
    BatchNorm's counter come from the last). Config, tokenizer and position of the last."""
    if not paths:
        raise CheckpointError("average: no checkpoints given")
    states = [load(p) for p in paths]
    keys = states[-1]["model"].keys()
    for p, s in zip(paths, states):
        if s["model"].keys() != keys or s["config"]["model"] != states[-1]["config"]["model"]:
            raise CheckpointError(f"{p}: a different model than {paths[-1]}; cannot average")
    model = {}
    for k, last in states[-1]["model"].items():
        if last.is_floating_point():
            model[k] = (sum(s["model"][k].double() for s in states) / len(states)).to(last.dtype)
        else:
            model[k] = last.clone()
    return {"model": model, "config": states[-1]["config"], "tokenizer": states[-1]["tokenizer"],
            "position": states[-1].get("position", {}), "averaged": [str(p) for p in paths]}


def load_model(path: str | Path) -> tuple[ConformerCTC, Any, Config]:
    """Rebuild the model exactly as trained (strict: every tensor must match) in eval mode."""
    state = load(path)
    cfg = Config.from_dict(state["config"], f"{path}: config")
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    return model, tokenizer_from_state(state["tokenizer"]), cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpc-asr checkpoint", description="Checkpoint tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    avg = sub.add_parser("average", help="mean of the models of several checkpoints")
    avg.add_argument("--out", required=True)
    avg.add_argument("checkpoints", nargs="+")
    args = p.parse_args(argv)
    try:
        save(args.out, average(args.checkpoints))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[checkpoint] {args.out}: mean of {len(args.checkpoints)} checkpoints", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
