"""Preemption: SIGUSR1/SIGTERM (a scheduler's warning before the kill) set a flag that the
training loop allreduces at the next optimizer step; every rank then exits ``EXIT_PREEMPTED``
after rank 0 has written ``last.pt``. Also the test hooks that make such runs deterministic."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path

__all__ = ["EXIT_PREEMPTED", "Preempted", "SignalFlag", "inf_hook", "step_pause", "wait_for_signal_hook"]

EXIT_PREEMPTED = 3  # exit status of every rank after a SIGUSR1/SIGTERM checkpoint: requeue me
TEST_INF_STEP = "HPC_ASR_TEST_INF_STEP"  # test hook: "STEP[:RANK]" multiplies that step's loss by inf
TEST_WAIT_SIGNAL = "HPC_ASR_TEST_WAIT_SIGNAL"  # test hook: "STEP:RANK" waits there for a real signal
TEST_STEP_SLEEP = "HPC_ASR_TEST_STEP_SLEEP"  # test hook: seconds to pause after each optimizer step


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is written."""


class SignalFlag:
    """SIGUSR1/SIGTERM set ``raised``; the handlers are restored on close."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.raised = 0
        self._old = {}
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread (e.g. some test runners)
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = signum

    def close(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def wait_for_signal_hook(flag: SignalFlag, world, step: int, out: Path) -> None:
    """Test hook: at optimizer step STEP, rank RANK writes its pid and waits (≤ 120 s) until a
    signal from outside sets the flag, so a test can preempt one chosen rank deterministically."""
    spec = os.environ.get(TEST_WAIT_SIGNAL)
    if not spec:
        return
    at, rank = (int(x) for x in spec.split(":"))
    if (at, rank) != (step, world.rank):
        return
    (out / f"waiting.rank{world.rank}").write_text(str(os.getpid()))
    deadline = time.time() + 120
    while not flag.raised and time.time() < deadline:
        time.sleep(0.01)


def inf_hook(step: int, rank: int) -> float:
    spec = os.environ.get(TEST_INF_STEP)
    if not spec:
        return 1.0
    at, _, who = spec.partition(":")
    return math.inf if int(at) == step and (not who or int(who) == rank) else 1.0


def step_pause() -> None:
    """Test hook: pause after each optimizer step (lets a test change elastic hosts mid-run)."""
    time.sleep(float(os.environ.get(TEST_STEP_SLEEP, 0)))
