"""The plan of a job chain: what each stage (prep → train → evaluate → export) asks of the
scheduler and which commands it runs, from one training config, the site file and the flags of
``hpc-asr jobs``. Validated here; turned into script text by ``hpc_asr.ops.jobscript``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hpc_asr.cli import load_config
from hpc_asr.config import ConfigError
from hpc_asr.ops.site import JobError, Site

__all__ = ["STAGES", "Job", "Plan", "make_plan", "walltime_s"]

STAGES = ("prep", "train", "evaluate", "export")


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


def walltime_s(w: str) -> int:
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
    walltime_s(args.walltime or site.walltime)
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
