"""Submitting a rendered chain: ``sbatch``/``qsub`` with ``afterok`` dependencies, a fit check
against the partition's real nodes, and ``wait`` that follows the jobs and refuses requests that
can never start."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hpc_asr.ops.plan import STAGES, Plan
from hpc_asr.ops.site import JobError

__all__ = ["submit", "wait"]


# squeue reasons that never clear by waiting: the request cannot fit the partition or node.
_HOPELESS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
             "ReqNodeNotAvail", "InvalidAccount", "InvalidQOS")
_ORPHAN = "DependencyNeverSatisfied"  # a job it depends on (afterok) failed: it pends for ever
_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")


def _submit_cmd(scheduler: str, script: Path, dep: str | None) -> list[str]:
    if scheduler == "slurm":
        return ["sbatch", "--parsable", *([f"--dependency=afterok:{dep}"] if dep else []), str(script)]
    return ["qsub", *(["-W", f"depend=afterok:{dep}"] if dep else []), str(script)]


def _check_fit(plan: Plan) -> None:
    """Compare the request with what the partition's nodes really have (sinfo), before submitting."""
    if plan.scheduler != "slurm" or shutil.which("sinfo") is None:
        return
    cmd = ["sinfo", "-h", "-o", "%c"] + (["-p", plan.site.partition] if plan.site.partition else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    cpus = [int(x) for x in proc.stdout.split() if x.strip().isdigit()]
    if proc.returncode != 0 or not cpus:
        raise JobError(f"{' '.join(cmd)}: no nodes ({proc.stderr.strip() or 'empty partition'})")
    need = max(plan.cpus_per_task * j.ranks_per_node for j in plan.jobs)
    if need > max(cpus):
        raise JobError(f"jobs ask for {need} CPUs per node (cpus-per-task {plan.cpus_per_task}) but the "
                       f"largest node in partition {plan.site.partition or '(default)'} has {max(cpus)}")


def submit(plan: Plan, paths: dict[str, Path], dry_run: bool = False) -> list[str]:
    """Submit the chain prep → train → evaluate → export with afterok dependencies; returns job ids."""
    ids: list[str] = []
    if dry_run:
        for stage in STAGES:
            print(f"# ---- {paths[stage]}\n{paths[stage].read_text()}")
    else:
        _check_fit(plan)
    for i, stage in enumerate(STAGES):
        dep = (ids[-1] if ids else None) if not dry_run else (f"${STAGES[i - 1].upper()}_ID" if i else None)
        cmd = _submit_cmd(plan.scheduler, paths[stage], dep)
        if dry_run:
            print(f"{stage.upper()}_ID=$({shlex.join(cmd)})")
            continue
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            _cancel(plan.scheduler, ids)
            raise JobError(f"{shlex.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        ids.append(proc.stdout.strip().split(";")[0])
        print(f"[jobs] {stage}: {ids[-1]}  ({shlex.join(cmd)})", file=sys.stderr)
    if not dry_run:
        _refuse_hopeless(plan.scheduler, ids)
    return ids


def _cancel(scheduler: str, ids: list[str]) -> None:
    if ids:
        subprocess.run(["scancel" if scheduler == "slurm" else "qdel", *ids], capture_output=True)


def _slurm_state(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _refuse_hopeless(scheduler: str, ids: list[str], settle_s: float = 3.0) -> None:
    """A job that can never start stays PENDING silently (and ``sbatch --wait`` hangs): look at
    the reasons once the scheduler had a pass at them, and cancel the chain with the reason."""
    if scheduler != "slurm":
        return
    time.sleep(settle_s)
    for jid in ids:
        st = _slurm_state(jid)
        if st.get("JobState") == "PENDING" and st.get("Reason") in _HOPELESS:
            _cancel(scheduler, ids)
            raise JobError(f"job {jid} can never start (Reason={st['Reason']}: the request exceeds the "
                           f"partition's nodes or limits); chain {' '.join(ids)} cancelled")


def wait(ids: list[str], poll_s: float = 2.0, timeout_s: float = 0, cancel_orphans: bool = False) -> dict[str, str]:
    """Wait for SLURM jobs to end, printing every state change; returns {id: final state}.
    A job that can never start fails; one left pending because a job it depends on failed
    (``DependencyNeverSatisfied``) is cancelled with ``cancel_orphans`` (and said so), else fails."""
    last: dict[str, str] = {}
    names: dict[str, str] = {}
    t0 = time.time()
    while True:
        waiting = []  # (id, reason) of jobs pending on a dependency
        for jid in ids:
            st = _slurm_state(jid)
            state, names[jid] = st.get("JobState", "UNKNOWN"), st.get("JobName", "")
            show = f"{state} ({st.get('Reason')})" if state == "PENDING" else state
            if last.get(jid) != show:
                print(f"[jobs] {jid} {names[jid]}: {show} restarts={st.get('Restarts', 0)}",
                      file=sys.stderr, flush=True)
                last[jid] = show
            if state == "PENDING" and st.get("Reason") in _HOPELESS:
                raise JobError(f"job {jid} can never start (Reason={st['Reason']})")
            if state == "PENDING" and st.get("Reason", "").startswith("Dependency"):
                waiting.append((jid, st["Reason"]))
        finals = {j: last[j].split()[0] for j in ids}
        if any(reason == _ORPHAN for _, reason in waiting):  # and the jobs waiting on them, in one go
            orphans = [j for j, _ in waiting]
            failed = ", ".join(f"{j} ({names[j]}) {s}" for j, s in finals.items() if s not in (*_ACTIVE, "COMPLETED"))
            what = ", ".join(f"{j} ({names[j]})" for j in orphans)
            if not cancel_orphans:
                raise JobError(f"jobs {what} can never start ({_ORPHAN}: {failed or 'a dependency'} failed)")
            _cancel("slurm", orphans)
            print(f"[jobs] cancelled {what}: left pending on {_ORPHAN} after {failed or 'a dependency'}",
                  file=sys.stderr, flush=True)
        elif all(s not in _ACTIVE for s in finals.values()):
            return finals
        if timeout_s and time.time() - t0 > timeout_s:
            raise JobError(f"jobs {' '.join(ids)} still {finals} after {timeout_s:.0f}s")
        time.sleep(poll_s)
