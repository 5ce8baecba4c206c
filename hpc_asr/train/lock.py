"""One run per ``train.out_dir``: rank 0 holds ``OUT/train.lock`` while it trains.

Two runs writing one directory would interleave ``metrics.jsonl`` and overwrite each other's
``last.pt``. The lock file names its holder::

    {"host": "node17", "pid": 4242, "job": "123456", "scheduler": "slurm", "restart": 0, ...}

It is created with a hard link of a complete temporary file (exclusive and atomic, also on
Lustre and NFS, which may lack flock), and removed when the process exits. A second run refuses
with one line naming the holder. A lock whose holder cannot be running any more is taken over
with a warning: on the holder's host, its process is gone (or its pid now belongs to another
process); for a SLURM job, ``squeue`` no longer shows the job running, or it is this very job
restarted (a requeue: its earlier run is over). When none of that can be told (another host, no
job id, ``squeue`` unreachable) the lock stands and the line says which file to remove.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from hpc_asr.atomic import atomic_path, temp_name

__all__ = ["LOCK_NAME", "OutDirLocked", "RunLock", "acquire", "hold"]

LOCK_NAME = "train.lock"
# squeue states in which a job's processes may still be writing; any other state (or no entry) means they are gone
_LIVE = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING", "STAGE_OUT"}


class OutDirLocked(ValueError):
    """Another run holds train.out_dir (a ValueError: ``hpc-asr train`` prints it as one line, exit 2)."""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc is not there): a pid
    reused by another process has another start time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _me() -> dict:
    slurm = os.environ.get("SLURM_JOB_ID", "")
    job, scheduler = (slurm, "slurm") if slurm else (os.environ.get("PBS_JOBID", ""), "pbs")
    restart = os.environ.get("SLURM_RESTART_COUNT" if slurm else "PBS_RUN_COUNT", "0")
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
            "job": job, "scheduler": scheduler if job else "", "restart": restart,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": uuid.uuid4().hex}


def _describe(rec: dict) -> str:
    job = f"job {rec['job']}, " if rec.get("job") else ""
    return f"{job}pid {rec.get('pid')} on {rec.get('host')}, since {rec.get('since')}"


def _alive_here(rec: dict) -> bool:
    pid = int(rec.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    return not rec.get("pid_start") or _start_time(pid) in ("", rec["pid_start"])


def _slurm_job_running(job: str) -> bool | None:
    """Whether squeue shows the job running; None when squeue cannot tell (absent, no controller)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return False if "Invalid job id" in proc.stderr else None
    return any(state in _LIVE for state in proc.stdout.split())


def _stale(rec: dict, me: dict) -> str | None:
    """Why the recorded holder cannot be running any more, or None when it may be."""
    if rec.get("host") == me["host"]:
        if rec.get("pid") == me["pid"] and rec.get("pid_start") == me["pid_start"]:
            return ""  # an earlier run in this same process (it has returned): ours to take, silently
        return None if _alive_here(rec) else f"its process {rec.get('pid')} is gone"
    job = rec.get("job")
    if job and rec.get("scheduler") == "slurm":
        if job == me["job"] and str(rec.get("restart")) != str(me["restart"]):
            return f"job {job} was requeued since (its earlier run is over)"
        if _slurm_job_running(job) is False:
            return f"job {job} is no longer running (squeue)"
    return None


class RunLock:
    """The lock rank 0 holds; ``release`` removes the file if it still names this holder."""

    def __init__(self, path: Path, record: dict, warning: str = ""):
        self.path, self.record, self.warning = path, record, warning

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.record["token"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": "?", "since": f"unreadable {path}"}


def acquire(out: Path) -> RunLock:
    """Take ``out/train.lock`` (one process); OutDirLocked names the holder if another run has it."""
    path, me = Path(out) / LOCK_NAME, _me()
    for _ in range(5):  # a holder that releases while we look: try again
        tmp = temp_name(path)
        tmp.write_text(json.dumps(me) + "\n")
        try:
            os.link(tmp, path)  # exclusive and atomic; the lock appears with its contents
            return RunLock(path, me)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        rec = _read(path)
        if rec is None:
            continue
        why = _stale(rec, me)
        if why is None:
            raise OutDirLocked(f"train.out_dir {out} is in use by another run ({_describe(rec)}): wait for it, "
                               f"use another train.out_dir, or remove {path} if that run is gone")
        with atomic_path(path) as t:  # take over
            t.write_text(json.dumps(me) + "\n")
        warning = f"took over the stale lock {path} of {_describe(rec)}: {why}" if why else ""
        return RunLock(path, me, warning)
    raise OutDirLocked(f"{path}: could not be taken (it keeps changing): is another run starting?")


def hold(out: Path, engine, log, collective: bool = True) -> RunLock | None:
    """Every rank calls it at set-up: rank 0 takes the lock (released when the process exits) and
    the outcome is broadcast, so every rank of a refused run stops with the same line. Under
    Horovod elastic (``collective=False``: no collective before the elastic loop) rank 0 alone
    checks and stops. Returns rank 0's lock (None elsewhere): ``train()`` releases it when the run
    ends, the exit handler when the process dies first."""
    msg, lock = {"error": None, "warning": ""}, None
    if engine.world.is_main:
        try:
            lock = acquire(out)
            atexit.register(lock.release)
            msg["warning"] = lock.warning
        except OutDirLocked as e:
            msg["error"] = str(e)
    if collective:
        msg = engine.broadcast_object(msg)  # dist: all ranks go on, or all stop
    if msg["warning"] and engine.world.is_main:
        log(f"warning: {msg['warning']}")
    if msg["error"]:
        raise OutDirLocked(msg["error"])
    return lock
