"""Shared by the job tests: a site file to render with, and `hpc-asr jobs` run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

__all__ = ["jobs", "site_file"]


def site_file(tmp_path: Path, **over) -> Path:
    site = {"scheduler": "slurm", "partition": "gpu", "account": "asr42", "walltime": "12:00:00",
            "prep_walltime": "01:00:00", "node_cpus": 64, "cpus_per_task": 8, "cpu_ranks_per_node": 4,
            "cpu_bind": "cores", "env": {"modules": ["hpc_asr/0.1.0"], "venv": ""},
            "nccl_env": str(ROOT / "env" / "nccl.env"), "local_scratch": "/local", "requeue_signal_s": 120}
    site.update(over)
    p = tmp_path / "site.yaml"
    p.write_text(json.dumps(site))
    return p


def jobs(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hpc_asr", "jobs", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpc_asr.ops.jobs {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc
