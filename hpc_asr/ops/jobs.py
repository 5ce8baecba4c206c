"""Batch jobs rendered from one config and one site file: SLURM and PBS, prep → train → evaluate → export.

    python -m hpc_asr jobs render --scheduler slurm --nodes 4 --gpus-per-node 8 --config my.yaml --out jobs/exp7
    python -m hpc_asr jobs submit ...same options... [--dry-run] [--wait]

``render`` writes one script per stage (``prep``, ``train``, ``evaluate``, ``export``) with
long-form directives; ``submit`` renders, then submits the chain with ``afterok`` dependencies.
Site defaults (partition, account, node size, modules, NCCL presets) come from the site file
(``--site``, ``$HPC_ASR_SITE``, the module's own ``env/site.yaml``: see ``hpc_asr.ops.site``);
command-line flags win. Render checks every flag, and that each manifest and shard the chain
reads exists or is written by an earlier job. The train job asks for a warning signal before its
time limit (USR1), forwards it to the ranks (which checkpoint ``last.pt`` and exit with status 3)
and requeues itself; a TERM (``scancel``, ``qdel``) ends it after the ranks checkpoint, with no
requeue. ``--portable`` renders without absolute paths (the checked-in ``jobs/slurm``, ``jobs/pbs``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from hpc_asr.atomic import atomic_path, write_json_atomic
from hpc_asr.ops.jobscript import SUFFIX, parse_directives, script
from hpc_asr.ops.plan import Plan, check_paths, make_plan
from hpc_asr.ops.site import JobError, Site, load_site
from hpc_asr.ops.submit import submit, wait

__all__ = ["JobError", "Plan", "Site", "load_site", "make_plan", "parse_directives", "render", "submit", "wait"]


def render(plan: Plan, out: Path) -> dict[str, Path]:
    """Write one script per stage into ``out``; returns {stage: path}."""
    out.mkdir(parents=True, exist_ok=True)
    Path(plan.logdir).mkdir(parents=True, exist_ok=True)
    paths = {}
    for job in plan.jobs:
        p = out / f"{job.stage}.{SUFFIX[plan.scheduler]}"
        with atomic_path(p) as tmp:
            tmp.write_text(script(plan, job))
            tmp.chmod(0o755)
        paths[job.stage] = p
    write_json_atomic(out / "jobs.json", {"scheduler": plan.scheduler, "stages": {k: str(v) for k, v in paths.items()},
                                          "logs": plan.logdir, "run_dir": plan.run_dir, "command": plan.command})
    return paths


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
        s.add_argument("--corpus", help="directory with the manifests: data.train=.../NAME is prepared from "
                                        "CORPUS/NAME.jsonl (default: two levels above data.train)")
        s.add_argument("--out", required=True, help="directory for the scripts (logs under OUT/logs)")
        s.add_argument("--site", help="site file (default: $HPC_ASR_SITE, then $HPC_ASR_HOME/env/site.yaml, "
                                      "then ./env/site.yaml)")
        s.add_argument("--partition", help="SLURM partition / PBS queue")
        s.add_argument("--account")
        s.add_argument("--walltime", help="train job time limit [D-]HH:MM:SS")
        s.add_argument("--prep-walltime")
        s.add_argument("--workdir", help="directory the jobs run in (default: here; --portable: where you submit)")
        s.add_argument("--portable", action="store_true",
                       help="no absolute paths: relative paths stay relative and the jobs run in the directory "
                            "they are submitted from (scripts to check in or copy, e.g. jobs/slurm)")
        s.add_argument("--no-path-check", action="store_true",
                       help="render even if a manifest the chain reads is not here (scripts for another machine)")
        s.add_argument("--stage", action="store_true", help="copy train/dev shards to node-local disk first")
        s.add_argument("--serve-port", type=int, default=8000, help="port of the serve job's service")
        s.add_argument("--serve-walltime", help="serve job time limit (default: the train walltime)")
        s.add_argument("--serve-partition", help="partition/queue of the inference nodes (default: --partition)")
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
    command = shlex.join(["hpc-asr", "jobs", *argv, *(["--", *overrides] if overrides else [])])
    args = _parser().parse_args(argv)
    args.overrides = overrides
    try:
        plan = make_plan(args, load_site(args.site))
        plan.command = command
        if not args.no_path_check:
            check_paths(plan, Path(plan.workdir or os.getcwd()))
        paths = render(plan, Path(args.out))
        if args.cmd == "render":
            for stage, path in paths.items():
                print(f"{stage:9s} {path}")
            print(f"evaluate and export use {plan.checkpoint_note}")
            return 0
        ids = submit(plan, paths, dry_run=args.dry_run)
        if ids:
            print(" ".join(ids))
        if args.wait and ids and plan.scheduler == "slurm":
            finals = wait(ids, cancel_orphans=True)
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
