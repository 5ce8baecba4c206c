"""What a training checkpoint holds and how a run reads it back: the position (epoch, global
batches, schedule step, history, dev results), the state written to ``last.pt`` / step snapshots,
and the comparison of the checkpoint's config with the current one. ``run`` is train's ``_Run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc_asr import checkpoint
from hpc_asr.config import Config

__all__ = ["ResumeError", "compare_configs", "new_position", "restore", "save", "state_dict"]


class ResumeError(RuntimeError):
    """The checkpoint cannot continue this run (mismatched config, failed strict load)."""


def new_position(world_size: int, accum: int) -> dict:
    """A fresh run's position; ``sched_unit`` is the global batch the schedule is counted in."""
    return {"epoch": 0, "batch": 0, "gbatch": 0, "step": 0, "sched_step": 0.0, "skipped_steps": 0,
            "history": [], "wall_s": 0.0, "dev": [], "best": None, "step_ckpts": [],
            "sched_unit": {"ranks": world_size, "accum_steps": accum}}


# Keys whose change makes a checkpoint unusable (a different network or different inputs).
_INCOMPATIBLE_SECTIONS = ("model", "features")


def compare_configs(saved: dict, current: Config) -> list[str]:
    """Benign differences as 'section.key old -> new'; incompatible ones raise ResumeError."""
    now = current.to_dict()
    bad, benign = [], []
    for section, values in now.items():
        for key, value in values.items():
            old = (saved.get(section) or {}).get(key, value)
            if old == value:
                continue
            (bad if section in _INCOMPATIBLE_SECTIONS else benign).append(f"{section}.{key} {old!r} -> {value!r}")
    if bad:
        raise ResumeError(f"checkpoint was trained with a different model/features: {'; '.join(bad)}")
    return benign


def restore(run: Any, last: Path) -> tuple[dict, list[str]]:
    """Load ``last`` into the run's model, optimizer and scaler (strictly); the saved position and
    the benign config changes. Rank 0 only, or every rank under Horovod elastic."""
    state = checkpoint.load(last)
    changed = compare_configs(state["config"], run.cfg)
    try:
        run.model.load_state_dict(state["model"], strict=True)
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ResumeError(f"strict load failed: {' '.join(str(e).split())}") from None  # one line
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    saved = state["position"]
    pos = {**new_position(run.world.size, run.cfg.train.accum_steps), **saved}
    if "sched_step" not in saved:  # written before schedule steps existed: same world assumed
        pos["sched_step"], pos["gbatch"] = float(saved["step"]), saved["batch"] * run.world.size
    return pos, changed


def state_dict(run: Any) -> dict:
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "config": run.cfg.to_dict(),
            "tokenizer": run.tok.state_dict(), "position": run.pos}


def save(run: Any, step_copy: bool = False) -> None:
    """last.pt (atomic, rank 0); with ``step_copy`` also step-NNNNNNNN.pt, keeping the last K."""
    if not run.world.is_main:
        return
    run.pos["wall_s"] = run.wall()
    last = run.out / "last.pt"
    if step_copy:
        name = f"step-{run.pos['step']:08d}.pt"
        if name not in run.pos["step_ckpts"]:
            run.pos["step_ckpts"].append(name)
        for old in run.pos["step_ckpts"][: -run.cfg.train.keep_last]:
            (run.out / old).unlink(missing_ok=True)
        run.pos["step_ckpts"] = run.pos["step_ckpts"][-run.cfg.train.keep_last :]
    checkpoint.save(last, state_dict(run))
    if step_copy:
        checkpoint.copy(last, run.out / run.pos["step_ckpts"][-1])
