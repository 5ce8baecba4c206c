"""The text of each job script: scheduler directives, environment (modules, NCCL/IB presets,
rendezvous address), the launcher line, and the train job's signal handling. Pure functions of a
``Plan``; ``parse_directives`` reads the directives back (tests, ``submit`` checks)."""

from __future__ import annotations

import shlex
from pathlib import Path

from hpc_asr.ops.plan import CKPT, PORT, Job, Plan, walltime_s
from hpc_asr.ops.site import JobError
from hpc_asr.train.preempt import EXIT_PREEMPTED  # the trainer's status after a signal checkpoint

__all__ = ["LAUNCH_TRIES", "SUFFIX", "parse_directives", "script"]

LAUNCH_TRIES = 3  # train launches per run when the launcher exits 0 without running train
SUFFIX = {"slurm": "sbatch", "pbs": "pbs"}
# mpirun, on TERM, waits odls_base_sigkill_timeout (1 s by default), sends TERM to its ranks, waits
# as long again and sends KILL: 2 x 4 s fits PBS's default kill_delay of 10 s and leaves the ranks
# time to agree on a step and checkpoint (measured with OpenMPI 4.1).
PBS_TERM_GRACE_S = 4


def _q(cmd: list[str]) -> str:
    return " ".join(c if c in (CKPT, PORT) else shlex.quote(c) for c in cmd)


def _directives(plan: Plan, job: Job, name: str) -> list[str]:
    site, cpt = plan.site, plan.cpus_per_task
    account, partition = site.account, job.partition or site.partition
    if plan.scheduler == "slurm":
        d = [f"--job-name={name}", f"--nodes={job.nodes}", f"--ntasks-per-node={job.ranks_per_node}",
             f"--cpus-per-task={cpt}", f"--time={job.walltime}"]
        if job.gpus_per_node:
            d.append(f"--gpus-per-node={job.gpus_per_node}")
        if partition:
            d.append(f"--partition={partition}")
        if account:
            d.append(f"--account={account}")
        # append: a requeued job adds to its log instead of truncating the first run's
        d += [f"--output={plan.logdir}/%x-%j.out", "--open-mode=append"]
        if job.stage == "train":
            d += ["--requeue", f"--signal=B:USR1@{site.requeue_signal_s}"]
        return [f"#SBATCH {x}" for x in d]
    sel = f"select={job.nodes}:ncpus={cpt * job.ranks_per_node}:mpiprocs={job.ranks_per_node}"
    if job.gpus_per_node:
        sel = sel.replace(":mpiprocs", f":ngpus={job.gpus_per_node}:mpiprocs")
    d = [f"-N {name}", f"-l {sel}", "-l place=scatter", f"-l walltime={job.walltime}", "-j oe",
         f"-o {plan.logdir}/", f"-r {'y' if job.stage == 'train' else 'n'}"]
    if partition:
        d.append(f"-q {partition}")
    if account:
        d.append(f"-A {account}")
    return [f"#PBS {x}" for x in d]


def _env_block(plan: Plan, job: Job) -> list[str]:
    site, lines = plan.site, []
    modules, venv = list(site.env.get("modules") or []), site.env.get("venv") or ""
    if modules:
        names = " ".join(modules)
        lines += ["type module >/dev/null 2>&1 || source /etc/profile >/dev/null 2>&1 || true",
                  f"module load {names} || {{ echo '[job] error: module load {names} failed "
                  f"({site.path}: env.modules)' >&2; exit 2; }}"]
    elif venv:
        lines.append(f"source {shlex.quote(venv)}/bin/activate")
    for key, value in site.nccl_vars():
        lines.append(f'export {key}="${{{key}:-{value}}}"')
    lines.append(f"export OMP_NUM_THREADS={plan.cpus_per_task}")
    if plan.scheduler == "slurm":
        lines.append("export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun no longer inherits it (22.05+)")
        lines.append('MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
        lines.append("export MASTER_ADDR MASTER_PORT=$((20000 + ${SLURM_JOB_ID%%[!0-9]*} % 20000))")
        lines.append('echo "[job] nodes $SLURM_JOB_NODELIST, MASTER_ADDR=$MASTER_ADDR:$MASTER_PORT"')
    else:
        lines.append('NODES=$(sort -u "$PBS_NODEFILE" | wc -l)')
        lines.append('export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"  # mpirun -x wants it set')
        lines.append('export MASTER_ADDR=$(head -n 1 "$PBS_NODEFILE")')
        lines.append("export MASTER_PORT=$((20000 + ${PBS_JOBID%%[!0-9]*} % 20000))")
        lines.append('echo "[job] $NODES node(s), MASTER_ADDR=$MASTER_ADDR:$MASTER_PORT"')
    return lines


def _launcher(plan: Plan, job: Job, per_node: bool = False) -> str:
    """The MPI launch prefix: srun with PMIx under SLURM, mpirun over $PBS_NODEFILE under PBS."""
    if plan.scheduler == "slurm":
        if not job.mpi:
            return "srun --mpi=pmix --ntasks=1"
        bind = "cores" if plan.site.cpu_bind == "cores" and not job.gpus_per_node else "none"
        extra = " --ntasks-per-node=1 --ntasks=$SLURM_NNODES" if per_node else ""
        return f"srun --mpi=pmix --kill-on-bad-exit=1 --cpu-bind={bind}{extra}"
    if not job.mpi:
        return ""
    keys = [k for k, _ in plan.site.nccl_vars()] + ["OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT",
                                                    "PATH", "LD_LIBRARY_PATH"]
    if per_node:
        np_, bind = "$NODES", "-bind-to none -map-by ppr:1:node"
    elif plan.site.cpu_bind == "cores" and not job.gpus_per_node:
        np_, bind = f"$((NODES*{job.ranks_per_node}))", f"-bind-to core -map-by slot:PE={plan.cpus_per_task}"
    else:
        np_, bind = f"$((NODES*{job.ranks_per_node}))", "-bind-to none -map-by slot"
    xs = " ".join(f"-x {k}" for k in keys)
    return (f'mpirun -np {np_} --hostfile "$PBS_NODEFILE" {bind} '
            f'--mca odls_base_sigkill_timeout {PBS_TERM_GRACE_S} {xs}')


def _stage_lines(plan: Plan, job: Job) -> tuple[list[str], list[str]]:
    """Node-local staging of the train/dev shards; returns (lines, extra train overrides)."""
    if not plan.stage_data:
        return [], []
    jid = "$SLURM_JOB_ID" if plan.scheduler == "slurm" else "$PBS_JOBID"
    srcs = [o.split("=", 1)[1] for o in plan.train_overrides]
    per_node = _launcher(plan, job, per_node=True)
    lines = [f'STAGE_DIR="{plan.site.local_scratch}/hpc_asr-{jid}"',
             "# the copy is removed on every node when the job ends, failed or not (after a scancel/qdel no new",
             "# job step can start: then only this node's copy goes; sites with per-job TMPDIRs purge the rest)",
             f'unstage() {{ timeout 120 {per_node} rm -rf "$STAGE_DIR" 2>/dev/null; rm -rf "$STAGE_DIR"; }}',
             "trap unstage EXIT",
             "# one copier per node (the others wait on its lock), checksums verified",
             f"{per_node} python -m hpc_asr stage --dest \"$STAGE_DIR\" {_q(srcs)} || exit 2"]
    names = [Path(s).name for s in srcs]
    if len(set(names)) != len(names):
        raise JobError(f"--stage: train and dev directories share the name {names[0]!r}")
    return lines, [f'--data.train="$STAGE_DIR/{names[0]}"', f'--data.dev="$STAGE_DIR/{names[1]}"']


def _train_body(plan: Plan, job: Job) -> list[str]:
    """Run the ranks in the background so the batch shell can take signals while they train:

    - USR1 is the warning the job asked for (SLURM ``--signal=B:USR1@N``; PBS: the timer below):
      forwarded to the ranks, which checkpoint and exit 3; then the job requeues itself.
    - TERM is someone ending the job (``scancel``/``qdel``, ``scontrol requeue``, the time limit):
      forwarded, the ranks checkpoint if the scheduler's grace time allows, the job exits and does
      not requeue itself (a node failure or ``scontrol requeue`` is requeued by the scheduler)."""
    stage, extra = _stage_lines(plan, job)
    cmd = f"{_launcher(plan, job)} {_q(job.commands[0])} {' '.join(extra)}".strip()
    if plan.scheduler == "slurm":
        forward = 'scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$RANKS" 2>/dev/null'
        requeue = 'scontrol requeue "$SLURM_JOB_ID"'
        timer = []
    else:  # PBS has no warning-signal directive: a timer in the job gives the same warning
        forward = 'kill -USR1 "$RANKS" 2>/dev/null'  # mpirun forwards SIGUSR1 to every rank
        requeue = 'qrerun "$PBS_JOBID"'
        warn = max(walltime_s(job.walltime) - plan.site.requeue_signal_s, 1)
        timer = [f"( sleep {warn} && kill -USR1 $$ ) </dev/null >/dev/null 2>&1 &  "
                 f"# warning {plan.site.requeue_signal_s}s before walltime",
                 "TIMER=$!"]
    # qdel's TERM reaches every process of the job (mpirun and the ranks too); a second TERM from
    # here within 5 s makes mpirun abort at once without waiting for the ranks' checkpoint.
    stop_forward = '; [ -z "$RANKS" ] || kill -TERM "$RANKS" 2>/dev/null' if plan.scheduler == "slurm" else ""
    summary = shlex.quote(f"{plan.run_dir}/train_summary.json")
    return stage + timer + [
        "RANKS='' WARNED=0 STOPPED=0",
        f'warn() {{ WARNED=1; echo "[job] warning signal (USR1): ranks checkpoint and exit {EXIT_PREEMPTED}, '
        f'then the job requeues"; {forward}; }}',
        'stop() { STOPPED=1; echo "[job] TERM (scancel/qdel, scontrol requeue or the time limit): ranks checkpoint'
        f' and exit; this job does not requeue itself"{stop_forward}; }}',
        "trap warn USR1",
        "trap stop TERM",
        f'stamp() {{ stat -c %y {summary} 2>/dev/null || echo none; }}  # train writes it when it finishes',
        f"for TRY in $(seq {LAUNCH_TRIES}); do",
        "  BEFORE=$(stamp)",
        f"  {cmd} &",
        "  RANKS=$!",
        '  rc=0; wait "$RANKS" || rc=$?',
        '  while [ "$rc" -gt 128 ] && kill -0 "$RANKS" 2>/dev/null; do rc=0; wait "$RANKS" || rc=$?; done',
        # srun exits 0 when no task started at all ("task 0 launch failed", e.g. a requeued job's
        # step meeting the PMIx socket its previous run left behind); a new step gets a new socket.
        '  if [ "$rc" -eq 0 ] && [ "$WARNED$STOPPED" = 00 ] && [ "$(stamp)" = "$BEFORE" ]; then',
        '    rc=1; echo "[job] the launcher exited 0 but train did not finish (no new train_summary.json):'
        f' launching again in 10 s (try $TRY of {LAUNCH_TRIES})"; sleep 10; continue',
        "  fi",
        "  break",
        "done",
        *(['pkill -P "$TIMER" 2>/dev/null; kill "$TIMER" 2>/dev/null'] if timer else []),
        'if [ "$STOPPED" = 1 ]; then',
        '  echo "[job] stopped (train exited $rc); last.pt holds the last checkpoint: submit the train job again'
        ' to resume"',
        '  exit "$rc"',
        "fi",
        # The launcher may report a rank killed after the others exited 3 (kill-on-bad-exit): after
        # a warning any non-zero exit means "stopped at a checkpoint", and last.pt is atomic.
        'if [ "$WARNED" = 1 ] && [ "$rc" -ne 0 ]; then',
        '  echo "[job] checkpointed after the warning signal: requeueing; the next run resumes from last.pt"',
        # From here on a signal is the scheduler ending this run: no more forwarding (a scancel
        # from this dying shell would wait out the requeue and could signal the next run's ranks).
        "  trap - USR1 TERM",
        *(["  unstage; trap - EXIT  # the next run may start on another node: it copies again"] if stage else []),
        f"  {requeue} || {{ echo '[job] error: requeue refused; resubmit train to resume' >&2; "
        f"exit {EXIT_PREEMPTED}; }}",
        "  sleep 300  # the scheduler ends this run and starts the requeued one",
        "fi",
        'echo "[job] train exited $rc"',
        'exit "$rc"',
    ]


def _serve_body(job: Job) -> list[str]:
    """The service on this (inference) node: start it, wait for /readyz, say where it listens, then
    stay until the walltime or a scancel/qdel. TERM reaches the service itself (the scheduler
    signals the job's processes): it refuses new requests, finishes the ones in flight and exits."""
    return [f"PORT=${{SERVE_PORT:-{job.port}}}  # sbatch --export=ALL,SERVE_PORT=9000 ... to move it",
            f"{_q(job.commands[0])} &",
            "SERVER=$!",
            "trap 'echo \"[job] stop signal: the service drains in-flight requests and exits\"' TERM INT",
            "# health check: /readyz answers 200 once the model is loaded",
            "for _ in $(seq 1 300); do",
            "  python -c \"import sys, urllib.request as u; u.urlopen(f'http://127.0.0.1:{sys.argv[1]}/readyz', "
            "timeout=2)\" \"$PORT\" 2>/dev/null && break",
            '  kill -0 "$SERVER" 2>/dev/null || { echo "[job] the service exited before it was ready"; exit 1; }',
            "  sleep 1",
            "done",
            'echo "[job] serving http://$(hostname -f):$PORT (POST /v1/recognize, WebSocket /v1/stream, /metrics)"',
            'rc=0; wait "$SERVER" || rc=$?',
            'while kill -0 "$SERVER" 2>/dev/null; do rc=0; wait "$SERVER" || rc=$?; done  # a signal ended wait',
            'echo "[job] serve ended with status $rc"',
            'exit "$rc"']


def _checkpoint_lines(job: Job) -> list[str]:
    """evaluate/export read the best checkpoint the run has (avg.pt, else best.pt, else last.pt)."""
    first, *rest = job.checkpoints
    lines = [f"CKPT={shlex.quote(first)}"]
    for alt in rest:
        lines.append(f'[ -f "$CKPT" ] || {{ echo "[job] $CKPT not found: using {alt}"; CKPT={shlex.quote(alt)}; }}')
    lines.append(f'echo "[job] {job.stage}: checkpoint $CKPT"')
    return lines


def _header(plan: Plan, job: Job) -> list[str]:
    return [f"# hpc_asr {job.stage} job, generated by `hpc-asr jobs render` (hpc_asr/ops/jobscript.py):",
            f"#   {plan.command}",
            "# Make your own with the same command and your config/site file; edit those, not this script."]


def script(plan: Plan, job: Job) -> str:
    name = f"hpc_asr-{job.stage}"
    jid, rc = ("$SLURM_JOB_ID", "${SLURM_RESTART_COUNT:-0}") if plan.scheduler == "slurm" else \
        ("$PBS_JOBID", "${PBS_RUN_COUNT:-0}")
    submit_dir = "${SLURM_SUBMIT_DIR:?}" if plan.scheduler == "slurm" else "${PBS_O_WORKDIR:?}"
    workdir = shlex.quote(plan.workdir) if plan.workdir else f'"{submit_dir}"  # the directory you submit from'
    head = ["#!/bin/bash", *_header(plan, job), *_directives(plan, job, name),
            "set -uo pipefail", f"cd {workdir}",
            f'echo "[job] {name} {jid} run {rc} on $(hostname) at $(date -u +%FT%TZ)"',
            *_env_block(plan, job)]
    if job.stage == "train":
        body = _train_body(plan, job)
    elif job.stage == "serve":
        body = _serve_body(job)
    else:
        launch = _launcher(plan, job)
        body = _checkpoint_lines(job) if job.checkpoints else []
        body += [f"{launch} {_q(c)} || exit $?".strip() for c in job.commands]
        body.append(f'echo "[job] {job.stage} done"')
    return "\n".join(head + body) + "\n"


def parse_directives(text: str) -> dict[str, list[str]]:
    """``#SBATCH --key=value`` → {key: [value]}; ``#PBS -l a=b`` → {'l': ['a=b']} (repeats kept)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[8:].strip().lstrip("-").partition("=")
        elif line.startswith("#PBS "):
            key, _, value = line[5:].strip().lstrip("-").partition(" ")
        else:
            continue
        out.setdefault(key, []).append(value.strip())
    return out
