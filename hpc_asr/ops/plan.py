"""The plan of a job chain: what each stage (prep → train → evaluate → export) asks of the
scheduler and which commands it runs, from one training config, the site file and the flags of
``hpc-asr jobs``. Validated here; turned into script text by ``hpc_asr.ops.jobscript``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpc_asr.cli import load_config
from hpc_asr.ops.site import JobError, Site
from hpc_asr.validate import ConfigError, validate

__all__ = ["CKPT", "PORT", "STAGES", "Job", "Plan", "make_plan", "walltime_s"]

STAGES = ("prep", "train", "evaluate", "export")  # the chain submit runs; serve is rendered, submitted by hand
CKPT = '"$CKPT"'  # the checkpoint evaluate/export read: picked by the job script (see Job.checkpoints)
PORT = '"$PORT"'  # the serve job's port: --serve-port, or SERVE_PORT in the job's environment


@dataclass
class Job:
    """One stage: resources, the commands its body runs (``mpi``: one rank per task), the paths it
    reads and writes (checked along the chain), and for evaluate/export the checkpoints to use,
    best first (the script takes the first that exists and says which)."""

    stage: str
    nodes: int
    ranks_per_node: int
    gpus_per_node: int
    walltime: str
    commands: list[list[str]]
    mpi: bool = True
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    port: int = 0  # serve: the port the service listens on
    partition: str = ""  # another partition/queue than the site's (serve: the inference nodes)


@dataclass
class Plan:
    scheduler: str
    site: Site
    jobs: list[Job]
    cpus_per_task: int
    workdir: str  # "" = the directory the job is submitted from ($SLURM_SUBMIT_DIR / $PBS_O_WORKDIR)
    logdir: str
    run_dir: str
    stage_data: bool
    train_overrides: list[str]
    checkpoint_note: str = ""
    command: str = "hpc-asr jobs render ..."  # the command line that made it, named in every script


@dataclass
class _Counts:
    """The numeric flags, checked by the config validator (one owner of range rules)."""

    nodes: int
    gpus_per_node: int
    ranks_per_node: int
    cpus_per_task: int
    node_cpus: int
    serve_port: int


def _check_counts(args: argparse.Namespace) -> None:
    counts = _Counts(args.nodes, args.gpus_per_node, args.ranks_per_node, args.cpus_per_task, args.node_cpus,
                     args.serve_port)
    try:
        validate(counts, "jobs", nodes=">=1", gpus_per_node=">=0", ranks_per_node=">=0", cpus_per_task=">=0",
                 node_cpus=">=0", serve_port=">0")
        if args.serve_port > 65535:
            raise ConfigError(f"jobs.serve_port must be <= 65535, got {args.serve_port}")
    except ConfigError as e:  # jobs.ranks_per_node → the flag the user typed
        raise JobError(re.sub(r"jobs\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None


def _check_site(site: Site) -> None:
    try:
        validate(site, "site", node_cpus=">=0", cpus_per_task=">=1", cpu_ranks_per_node=">=1",
                 requeue_signal_s=">=0")
    except ConfigError as e:
        raise JobError(f"{site.path}: {e}") from None


def walltime_s(w: str, what: str = "walltime") -> int:
    """``[D-]HH:MM:SS`` (or ``MM:SS``, ``HH:MM:SS``) in seconds; anything else fails naming ``what``."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", w.strip())
    if not m or (m.group(1) and not m.group(2)):
        raise JobError(f"{what} {w!r}: expected [D-]HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    if minutes >= 60 or seconds >= 60 or (m.group(1) and hours >= 24):
        raise JobError(f"{what} {w!r}: minutes and seconds must be < 60 (hours < 24 after a day count)")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise JobError(f"{what} {w!r}: must be longer than 0")
    return total


def _walltimes(args: argparse.Namespace, site: Site) -> tuple[str, str]:
    long, short = args.walltime or site.walltime, args.prep_walltime or site.prep_walltime
    long_s = walltime_s(long, "--walltime" if args.walltime else f"{site.path}: walltime")
    walltime_s(short, "--prep-walltime" if args.prep_walltime else f"{site.path}: prep_walltime")
    if site.requeue_signal_s >= long_s:
        raise JobError(f"{site.path}: requeue_signal_s {site.requeue_signal_s} leaves no training time in a "
                       f"train walltime of {long} ({long_s} s); lower it or raise --walltime")
    return long, short


def _path(p: str, portable: bool) -> str:
    """A path as the scripts name it: absolute, or (``--portable``) as given relative to here."""
    return os.path.normpath(p) if portable and not os.path.isabs(p) else str(Path(p).resolve())


def _checkpoints(cfg, run_dir: str) -> tuple[list[str], str]:
    """Which checkpoint evaluate and export read, best first, and why."""
    if cfg.train.average_last and cfg.train.ckpt_every_steps:
        return ([f"{run_dir}/avg.pt", f"{run_dir}/last.pt"],
                f"avg.pt (train.average_last={cfg.train.average_last}: mean of the last step checkpoints)")
    if cfg.data.dev:
        return [f"{run_dir}/best.pt", f"{run_dir}/last.pt"], "best.pt (lowest dev WER; train.average_last is 0)"
    return [f"{run_dir}/last.pt"], "last.pt (no dev set, train.average_last is 0)"


def check_paths(plan: Plan, here: Path) -> None:
    """Every path a job reads exists (relative ones under the job's directory ``here``) or is
    written by an earlier job in the chain; the first that is neither fails, named."""
    written: set[str] = set()
    for job in plan.jobs:
        for p in job.reads:
            if os.path.normpath(p) in written or (here / p).exists():
                continue
            hint = " (prep makes data.<split>=DIR from CORPUS/<name of DIR>.jsonl; --corpus sets CORPUS)" \
                if p.endswith(".jsonl") else ""
            where = "" if os.path.isabs(p) else f" under {here}"
            raise JobError(f"the {job.stage} job reads {p}: not found{where} and no earlier job in the chain "
                           f"writes it{hint}; --no-path-check renders for another machine")
        written.update(os.path.normpath(p) for p in job.writes)


def make_plan(args: argparse.Namespace, site: Site) -> Plan:
    """Resources and commands of every stage, validated against the site's node size."""
    scheduler = args.scheduler or site.scheduler
    site = dataclasses.replace(site, partition=site.partition if args.partition is None else args.partition,
                               account=site.account if args.account is None else args.account)
    _check_counts(args)
    _check_site(site)
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
    long, short = _walltimes(args, site)
    portable = getattr(args, "portable", False)
    cfg_args = ["--config", _path(args.config, portable)] if args.config else []
    corpus = args.corpus or str(Path(cfg.data.train).parent.parent)
    splits = {"train": cfg.data.train, "dev": cfg.data.dev, "test": cfg.data.test}
    pairs = list(dict.fromkeys((f"{corpus}/{Path(d).name}.jsonl", d) for d in splits.values() if d))
    prep = [["python", "-m", "hpc_asr", "prep", "fbank", *cfg_args, "--manifest", m, "--out", d, "--threads", str(cpt)]
            for m, d in pairs]
    run_dir = cfg.train.out_dir
    ckpts, note = _checkpoints(cfg, run_dir)
    train = [["python", "-m", "hpc_asr", "train", *cfg_args, "--train.out_dir", run_dir, *args.overrides]]
    evaluate = [["python", "-m", "hpc_asr", "evaluate", "--checkpoint", CKPT, "--data", cfg.data.test,
                 "--out", f"{run_dir}/eval.json"]]
    export = [["python", "-m", "hpc_asr", "export", "--checkpoint", CKPT, "--data", cfg.data.test,
               "--out-dir", f"{run_dir}/export"]]
    serve = [["python", "-m", "hpc_asr", "serve", *cfg_args, "--model-dir", f"{run_dir}/export", "--host", "0.0.0.0",
              "--port", PORT]]
    gpu1 = 1 if args.gpus_per_node else 0
    outputs = [f"{run_dir}/{n}" for n in ("last.pt", "best.pt", "avg.pt")]
    jobs = [Job("prep", args.nodes, ppn, 0, short, prep, reads=[m for m, _ in pairs], writes=[d for _, d in pairs]),
            Job("train", args.nodes, ppn, args.gpus_per_node, long, train,
                reads=[cfg.data.train, *([cfg.data.dev] if cfg.data.dev else [])], writes=outputs),
            Job("evaluate", 1, 1, gpu1, short, evaluate, mpi=False, reads=[ckpts[-1], cfg.data.test],
                checkpoints=ckpts),
            Job("export", 1, 1, 0, short, export, mpi=False, reads=[ckpts[-1], cfg.data.test],
                writes=[f"{run_dir}/export"], checkpoints=ckpts),
            Job("serve", 1, 1, gpu1, args.serve_walltime or long, serve, mpi=False, reads=[f"{run_dir}/export"],
                port=args.serve_port, partition=args.serve_partition or "")]
    if args.serve_walltime:
        walltime_s(args.serve_walltime, "--serve-walltime")
    workdir = "" if portable and not args.workdir else _path(args.workdir or os.getcwd(), portable)
    logdir = _path(os.path.join(args.out, "logs"), portable)
    return Plan(scheduler, site, jobs, cpt, workdir, logdir, run_dir, args.stage,
                [f"--data.train={splits['train']}", f"--data.dev={splits['dev']}"], note)
