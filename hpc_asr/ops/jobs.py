"""Batch jobs rendered from one config and one site file: SLURM and PBS, prep → train → evaluate → export.

    python -m hpc_asr jobs render --scheduler slurm --nodes 4 --gpus-per-node 8 --config my.yaml --out jobs/exp7
    python -m hpc_asr jobs submit ...same options... [--dry-run] [--wait]

``render`` writes one script per stage (``prep``, ``train``, ``evaluate``, ``export``) with
long-form directives; ``submit`` renders, then submits the chain with ``afterok`` dependencies.
Site defaults (partition, account, node size, modules, NCCL presets) come from the site file
(``env/site.yaml``, or ``$HPC_ASR_SITE``, or ``--site``); command-line flags win. The train job
asks for a warning signal before its time limit, forwards it to the ranks (which checkpoint
``last.pt`` and exit with status 3) and requeues itself; the requeued job resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpc_asr.cli import load_config, read_yaml_mapping
from hpc_asr.config import ConfigError
from hpc_asr.train.preempt import EXIT_PREEMPTED  # the trainer's status after a signal checkpoint

__all__ = ["JobError", "Plan", "Site", "load_site", "make_plan", "parse_directives", "render", "submit"]

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("prep", "train", "evaluate", "export")
LAUNCH_TRIES = 3  # train launches per run when the launcher exits 0 without running train
SUFFIX = {"slurm": "sbatch", "pbs": "pbs"}


class JobError(ValueError):
    """A site file, option or resource request that cannot work; the message names it."""


@dataclass
class Site:
    """The cluster as HPC staff describe it (``env/site.yaml``); see that file for each key."""

    scheduler: str = "slurm"
    partition: str = ""
    account: str = ""
    walltime: str = "24:00:00"
    prep_walltime: str = "04:00:00"
    node_cpus: int = 0  # 0 = unknown: no fit check at render time
    cpus_per_task: int = 1
    cpu_ranks_per_node: int = 1
    cpu_bind: str = "none"
    env: dict = field(default_factory=lambda: {"modules": [], "venv": ""})
    nccl_env: str = "env/nccl.env"
    local_scratch: str = "${TMPDIR:-/tmp}"
    requeue_signal_s: int = 120
    modulefile: dict = field(default_factory=dict)
    path: str = "(defaults)"

    def nccl_vars(self) -> list[tuple[str, str]]:
        """(KEY, VALUE) pairs of the NCCL/IB preset file, comments dropped."""
        p = Path(self.nccl_env)
        p = p if p.is_absolute() else ROOT / p
        if not self.nccl_env:
            return []
        if not p.is_file():
            raise JobError(f"{self.path}: nccl_env: {p} not found")
        pairs = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, eq, value = line.partition("=")
            if not eq or not key.replace("_", "").isalnum():
                raise JobError(f"{p}:{n}: expected KEY=VALUE, got {line!r}")
            pairs.append((key.strip(), value.strip()))
        return pairs


def load_site(path: str | Path | None = None) -> Site:
    """Read the site file; unknown keys and wrong types fail with the file and key named."""
    path = Path(path or os.environ.get("HPC_ASR_SITE") or ROOT / "env" / "site.yaml")
    raw = read_yaml_mapping(path, "site file", error=JobError)
    fields = {f.name: f for f in dataclasses.fields(Site) if f.name != "path"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise JobError(f"{path}: unknown key(s) {unknown}; expected {sorted(fields)}")
    site = Site(path=str(path))
    for key, value in raw.items():
        default = getattr(site, key)
        if value is None:
            value = type(default)()
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise JobError(f"{path}: {key} must be an integer, got {value!r}")
        if isinstance(default, dict) and not isinstance(value, dict):
            raise JobError(f"{path}: {key} must be a mapping, got {value!r}")
        setattr(site, key, str(value) if isinstance(default, str) else value)
    if site.scheduler not in SUFFIX:
        raise JobError(f"{path}: scheduler must be slurm|pbs, got {site.scheduler!r}")
    if site.cpu_bind not in ("none", "cores"):
        raise JobError(f"{path}: cpu_bind must be none|cores, got {site.cpu_bind!r}")
    unknown_env = sorted(set(site.env) - {"modules", "venv"})
    if unknown_env:
        raise JobError(f"{path}: env: unknown key(s) {unknown_env}; expected ['modules', 'venv']")
    return site


# ---- what each job asks for and runs -------------------------------------------------------

@dataclass
class Job:
    """One stage: resources plus the commands its body runs (``mpi``: one rank per task)."""

    stage: str
    nodes: int
    ranks_per_node: int
    gpus_per_node: int
    walltime: str
    commands: list[list[str]]
    mpi: bool = True


@dataclass
class Plan:
    scheduler: str
    site: Site
    jobs: list[Job]
    cpus_per_task: int
    workdir: Path
    logdir: Path
    run_dir: str
    stage_data: bool
    train_overrides: list[str]


def _walltime_s(w: str) -> int:
    parts = w.replace("-", ":").split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise JobError(f"walltime {w!r}: expected [D-]HH:MM:SS") from None
    days = nums.pop(0) if len(nums) == 4 else 0
    while len(nums) < 3:
        nums.insert(0, 0)
    return ((days * 24 + nums[0]) * 60 + nums[1]) * 60 + nums[2]


def make_plan(args: argparse.Namespace, site: Site) -> Plan:
    """Resources and commands of every stage, validated against the site's node size."""
    scheduler = args.scheduler or site.scheduler
    site = dataclasses.replace(site, partition=site.partition if args.partition is None else args.partition,
                               account=site.account if args.account is None else args.account)
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise JobError(f"--nodes {args.nodes} / --gpus-per-node {args.gpus_per_node}: need nodes >= 1, gpus >= 0")
    ppn = args.ranks_per_node or (args.gpus_per_node or site.cpu_ranks_per_node)
    cpt = args.cpus_per_task or site.cpus_per_task
    node_cpus = args.node_cpus or site.node_cpus
    if node_cpus and cpt * ppn > node_cpus:
        raise JobError(
            f"cpus-per-task {cpt} x {ppn} ranks per node = {cpt * ppn} CPUs > {node_cpus} per node "
            f"(--node-cpus, or {site.path}: node_cpus); lower --cpus-per-task or --ranks-per-node")
    if args.gpus_per_node and ppn != args.gpus_per_node:
        print(f"[jobs] note: {ppn} ranks per node for {args.gpus_per_node} GPUs per node", file=sys.stderr)
    try:
        cfg = load_config(args.config, list(args.overrides))
    except ConfigError as e:
        raise JobError(str(e)) from None
    _walltime_s(args.walltime or site.walltime)
    workdir = Path(args.workdir or os.getcwd()).resolve()
    config = str(Path(args.config).resolve()) if args.config else None
    cfg_args = ["--config", config] if config else []
    corpus = args.corpus or str(Path(cfg.data.train).parent.parent)
    splits = {"train": cfg.data.train, "dev": cfg.data.dev, "test": cfg.data.test}
    prep = [["python", "-m", "hpc_asr", "prep", "fbank", *cfg_args, "--manifest", f"{corpus}/{s}.jsonl", "--out", d]
            for s, d in splits.items()]
    run_dir = cfg.train.out_dir
    ckpt = f"{run_dir}/last.pt"
    train = [["python", "-m", "hpc_asr", "train", *cfg_args, "--train.out_dir", run_dir, *args.overrides]]
    evaluate = [["python", "-m", "hpc_asr", "evaluate", "--checkpoint", ckpt, "--data", cfg.data.test,
                 "--out", f"{run_dir}/eval.json"]]
    export = [["python", "-m", "hpc_asr", "export", "--checkpoint", ckpt, "--data", cfg.data.test,
               "--out-dir", f"{run_dir}/export"]]
    gpu1 = 1 if args.gpus_per_node else 0
    short = args.prep_walltime or site.prep_walltime
    jobs = [Job("prep", args.nodes, ppn, 0, short, prep),
            Job("train", args.nodes, ppn, args.gpus_per_node, args.walltime or site.walltime, train),
            Job("evaluate", 1, 1, gpu1, short, evaluate, mpi=False),
            Job("export", 1, 1, 0, short, export, mpi=False)]
    logdir = Path(args.out).resolve() / "logs"
    return Plan(scheduler, site, jobs, cpt, workdir, logdir, run_dir, args.stage,
                [f"--data.train={splits['train']}", f"--data.dev={splits['dev']}"])


# ---- script text ---------------------------------------------------------------------------

def _q(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _directives(plan: Plan, job: Job, name: str) -> list[str]:
    site, cpt = plan.site, plan.cpus_per_task
    account = site.account
    if plan.scheduler == "slurm":
        d = [f"--job-name={name}", f"--nodes={job.nodes}", f"--ntasks-per-node={job.ranks_per_node}",
             f"--cpus-per-task={cpt}", f"--time={job.walltime}"]
        if job.gpus_per_node:
            d.append(f"--gpus-per-node={job.gpus_per_node}")
        if site.partition:
            d.append(f"--partition={site.partition}")
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
    if site.partition:
        d.append(f"-q {site.partition}")
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
    return f'mpirun -np {np_} --hostfile "$PBS_NODEFILE" {bind} {xs}'


def _stage_lines(plan: Plan, job: Job) -> tuple[list[str], list[str]]:
    """Node-local staging of the train/dev shards; returns (lines, extra train overrides)."""
    if not plan.stage_data:
        return [], []
    jid = "$SLURM_JOB_ID" if plan.scheduler == "slurm" else "$PBS_JOBID"
    srcs = [o.split("=", 1)[1] for o in plan.train_overrides]
    lines = [f'STAGE_DIR="{plan.site.local_scratch}/hpc_asr-{jid}"',
             "# one copier per node (the others wait on its lock), checksums verified",
             f"{_launcher(plan, job, per_node=True)} python -m hpc_asr stage --dest \"$STAGE_DIR\" "
             f"{_q(srcs)} || exit 2"]
    names = [Path(s).name for s in srcs]
    if len(set(names)) != len(names):
        raise JobError(f"--stage: train and dev directories share the name {names[0]!r}")
    return lines, [f'--data.train="$STAGE_DIR/{names[0]}"', f'--data.dev="$STAGE_DIR/{names[1]}"']


def _train_body(plan: Plan, job: Job) -> list[str]:
    """Run the ranks in the background so the batch shell can take the warning signal, forward
    it, and requeue when the trainer reports it checkpointed (exit status 3)."""
    stage, extra = _stage_lines(plan, job)
    cmd = f"{_launcher(plan, job)} {_q(job.commands[0])} {' '.join(extra)}".strip()
    if plan.scheduler == "slurm":
        forward = 'scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$RANKS" 2>/dev/null'
        requeue = 'scontrol requeue "$SLURM_JOB_ID"'
        timer = []
    else:  # PBS has no warning-signal directive: a timer in the job gives the same warning
        forward = 'kill -USR1 "$RANKS" 2>/dev/null'  # mpirun forwards SIGUSR1 to every rank
        requeue = 'qrerun "$PBS_JOBID"'
        warn = max(_walltime_s(job.walltime) - plan.site.requeue_signal_s, 1)
        timer = [f"( sleep {warn} && kill -USR1 $$ ) </dev/null >/dev/null 2>&1 &  "
                 f"# warning {plan.site.requeue_signal_s}s before walltime",
                 "TIMER=$!"]
    summary = shlex.quote(f"{plan.run_dir}/train_summary.json")
    return stage + timer + [
        "RANKS='' WARNED=0",
        f'warn() {{ WARNED=1; echo "[job] warning signal: ranks checkpoint and exit {EXIT_PREEMPTED}"; {forward}; }}',
        "trap warn USR1 TERM",
        f'stamp() {{ stat -c %y {summary} 2>/dev/null || echo none; }}  # train writes it when it finishes',
        f"for TRY in $(seq {LAUNCH_TRIES}); do",
        "  BEFORE=$(stamp)",
        f"  {cmd} &",
        "  RANKS=$!",
        '  rc=0; wait "$RANKS" || rc=$?',
        '  while [ "$rc" -gt 128 ] && kill -0 "$RANKS" 2>/dev/null; do rc=0; wait "$RANKS" || rc=$?; done',
        # srun exits 0 when no task started at all ("task 0 launch failed", e.g. a requeued job's
        # step meeting the PMIx socket its previous run left behind); a new step gets a new socket.
        '  if [ "$rc" -eq 0 ] && [ "$WARNED" = 0 ] && [ "$(stamp)" = "$BEFORE" ]; then',
        '    rc=1; echo "[job] the launcher exited 0 but train did not finish (no new train_summary.json):'
        f' launching again in 10 s (try $TRY of {LAUNCH_TRIES})"; sleep 10; continue',
        "  fi",
        "  break",
        "done",
        *(['pkill -P "$TIMER" 2>/dev/null; kill "$TIMER" 2>/dev/null'] if timer else []),
        # The launcher may report a rank killed after the others exited 3 (kill-on-bad-exit): after
        # a warning any non-zero exit means "stopped at a checkpoint", and last.pt is atomic.
        f'if [ "$rc" -eq {EXIT_PREEMPTED} ] || {{ [ "$WARNED" = 1 ] && [ "$rc" -ne 0 ]; }}; then',
        '  echo "[job] checkpointed after the warning signal: requeueing; the next run resumes from last.pt"',
        # From here on a signal is the scheduler ending this run: no more forwarding (a scancel
        # from this dying shell would wait out the requeue and could signal the next run's ranks).
        "  trap - USR1 TERM",
        f"  {requeue} || {{ echo '[job] error: requeue refused; resubmit train to resume' >&2; "
        f"exit {EXIT_PREEMPTED}; }}",
        "  sleep 300  # the scheduler ends this run and starts the requeued one",
        "fi",
        'echo "[job] train exited $rc"',
        'exit "$rc"',
    ]


def _script(plan: Plan, job: Job) -> str:
    name = f"hpc_asr-{job.stage}"
    jid, rc = ("$SLURM_JOB_ID", "${SLURM_RESTART_COUNT:-0}") if plan.scheduler == "slurm" else \
        ("$PBS_JOBID", "${PBS_RUN_COUNT:-0}")
    head = ["#!/bin/bash", f"# hpc_asr {job.stage} job, rendered by `python -m hpc_asr jobs render`; "
            "edit the site file or the flags, not this script.", *_directives(plan, job, name),
            "set -uo pipefail", f"cd {shlex.quote(str(plan.workdir))}",
            f'echo "[job] {name} {jid} run {rc} on $(hostname) at $(date -u +%FT%TZ)"',
            *_env_block(plan, job)]
    if job.stage == "train":
        body = _train_body(plan, job)
    else:
        launch = _launcher(plan, job)
        body = [f"{launch} {_q(c)} || exit $?".strip() for c in job.commands]
        body.append(f'echo "[job] {job.stage} done"')
    return "\n".join(head + body) + "\n"


def render(plan: Plan, out: Path) -> dict[str, Path]:
    """Write one script per stage into ``out``; returns {stage: path}."""
    out.mkdir(parents=True, exist_ok=True)
    plan.logdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for job in plan.jobs:
        p = out / f"{job.stage}.{SUFFIX[plan.scheduler]}"
        p.write_text(_script(plan, job))
        p.chmod(0o755)
        paths[job.stage] = p
    (out / "jobs.json").write_text(json.dumps(
        {"scheduler": plan.scheduler, "stages": {k: str(v) for k, v in paths.items()},
         "logs": str(plan.logdir), "run_dir": plan.run_dir}, indent=1) + "\n")
    return paths


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


# ---- submission ----------------------------------------------------------------------------

# squeue reasons that never clear by waiting: the request cannot fit the partition or node.
_HOPELESS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
             "ReqNodeNotAvail", "InvalidAccount", "InvalidQOS", "DependencyNeverSatisfied")


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
            print(f"{stage.upper()}_ID=$({_q(cmd)})")
            continue
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            _cancel(plan.scheduler, ids)
            raise JobError(f"{_q(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        ids.append(proc.stdout.strip().split(";")[0])
        print(f"[jobs] {stage}: {ids[-1]}  ({_q(cmd)})", file=sys.stderr)
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


def wait(ids: list[str], poll_s: float = 2.0, timeout_s: float = 0) -> dict[str, str]:
    """Wait for SLURM jobs to end, printing every state change; returns {id: final state}."""
    last: dict[str, str] = {}
    t0 = time.time()
    while True:
        for jid in ids:
            st = _slurm_state(jid)
            state = st.get("JobState", "UNKNOWN")
            show = f"{state} ({st.get('Reason')})" if state == "PENDING" else state
            if last.get(jid) != show:
                print(f"[jobs] {jid} {st.get('JobName', '')}: {show} restarts={st.get('Restarts', 0)}",
                      file=sys.stderr, flush=True)
                last[jid] = show
            if state == "PENDING" and st.get("Reason") in _HOPELESS:
                raise JobError(f"job {jid} can never start (Reason={st['Reason']})")
        finals = {j: last[j].split()[0] for j in ids}
        if all(s not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")
               for s in finals.values()):
            return finals
        if timeout_s and time.time() - t0 > timeout_s:
            raise JobError(f"jobs {' '.join(ids)} still {finals} after {timeout_s:.0f}s")
        time.sleep(poll_s)


# ---- CLI -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpc-asr jobs", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("render", "submit"):
        s = sub.add_parser(name)
        s.add_argument("--scheduler", choices=sorted(SUFFIX), help="default: the site file's")
        s.add_argument("--nodes", type=int, default=1)
        s.add_argument("--gpus-per-node", type=int, default=0, help="0 = CPU-only nodes")
        s.add_argument("--ranks-per-node", type=int, default=0,
                       help="default: GPUs per node, or site cpu_ranks_per_node")
        s.add_argument("--cpus-per-task", type=int, default=0, help="default: site cpus_per_task")
        s.add_argument("--node-cpus", type=int, default=0, help="cores per node to validate against (site node_cpus)")
        s.add_argument("--config", help="training config (YAML); its data/train sections give the paths")
        s.add_argument("--corpus", help="directory with {train,dev,test}.jsonl (default: two levels above data.train)")
        s.add_argument("--out", required=True, help="directory for the scripts (logs under OUT/logs)")
        s.add_argument("--site", help="site file (default: $HPC_ASR_SITE or env/site.yaml)")
        s.add_argument("--partition", help="SLURM partition / PBS queue")
        s.add_argument("--account")
        s.add_argument("--walltime", help="train job time limit [D-]HH:MM:SS")
        s.add_argument("--prep-walltime")
        s.add_argument("--workdir", help="directory the jobs run in (default: here)")
        s.add_argument("--stage", action="store_true", help="copy train/dev shards to node-local disk first")
        if name == "submit":
            s.add_argument("--dry-run", action="store_true", help="print scripts and commands, submit nothing")
            s.add_argument("--wait", action="store_true", help="wait for the chain, printing state changes (SLURM)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:  # config overrides for the train job: ... -- --train.epochs 3
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    args.overrides = overrides
    try:
        plan = make_plan(args, load_site(args.site))
        paths = render(plan, Path(args.out))
        if args.cmd == "render":
            for stage, path in paths.items():
                print(f"{stage:9s} {path}")
            return 0
        ids = submit(plan, paths, dry_run=args.dry_run)
        if ids:
            print(" ".join(ids))
        if args.wait and ids and plan.scheduler == "slurm":
            finals = wait(ids)
            bad = {j: s for j, s in finals.items() if s != "COMPLETED"}
            if bad:
                print(f"error: jobs did not complete: {bad}; logs in {plan.logdir}", file=sys.stderr)
                return 1
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
