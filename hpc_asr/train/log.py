"""Training metrics on rank 0: metrics.jsonl, TensorBoard scalars, and a progress line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

__all__ = ["MetricsWriter", "Progress"]


class MetricsWriter:
    """Rank 0: one JSON object per line in out_dir/metrics.jsonl, and TensorBoard scalars in
    out_dir/tb when ``tensorboard`` is on and the package is installed (imported lazily)."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.file = open(out / "metrics.jsonl", "a", buffering=1) if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tb = None
            else:
                self.tb = SummaryWriter(str(out / "tb"))

    def write(self, kind: str, rec: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"kind": kind, **rec}) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, rec["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """One self-overwriting status line on stderr, on rank 0 of an interactive run only (a batch
    job's log gets the periodic log lines, not carriage returns)."""

    def __init__(self, enabled: bool, total: int, budget_s: float = 0.0):
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.t0, self.last = total, time.time(), ""
        self.budget_s = budget_s  # a time-budgeted run: the ETA is the budget left, not the steps left

    def update(self, step: int, epoch: int, loss: float | None = None) -> None:
        if not self.enabled:
            return
        if loss is not None:
            self.last = f" loss {loss:.3f}"
        elapsed = time.time() - self.t0
        rate = step / max(elapsed, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        of = f"/{self.total}"
        if self.budget_s:
            eta, of = max(self.budget_s - elapsed, 0.0), ""
        sys.stderr.write(f"\r[train] epoch {epoch} step {step}{of}{self.last} "
                         f"{rate:.2f} steps/s eta {eta:.0f}s\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
