"""A real one-node SLURM for the tests: slurmctld + slurmd from Debian's slurm-wlm, with state,
spool and logs in a temp dir, on ports of its own, shut down at the end of the session.

Settings follow what runs unprivileged-style on one machine: no munge (``auth/none``), no
cgroups (``proctrack/linuxproc``, ``task/none``), PMIx as the default MPI plugin. The node
offers this machine's CPUs, so a job asking for more stays PENDING with Reason=PartitionConfig
exactly as on a real cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SlurmCluster", "slurm_cluster"]

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    cpus: int
    partition: str = "debug"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in [k for k in env if k.startswith(("SLURM_", "OMPI_COMM", "PMIX_"))]:
            if k != "SLURM_CONF":
                env.pop(k)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def log(self, daemon: str) -> str:
        p = self.root / "log" / f"{daemon}.log"
        return p.read_text() if p.is_file() else ""


def _write_conf(root: Path, node: str, cpus: int, mem_mb: int) -> Path:
    ctld, slurmd = _free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=hpcasrtest
SlurmctldHost={node}
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=30
SchedulerParameters=sched_interval=2
NodeName={node} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """Start slurmctld + slurmd for the session; skip only when the binaries are not installed."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM binaries missing ({', '.join(missing)}): `make setup` installs slurm-wlm")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM runs slurmd as root (SlurmdUser=root); run the tests as root")
    root = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    node = socket.gethostname().split(".")[0]
    mem = int(open("/proc/meminfo").read().split()[1]) // 1024 - 1024
    cluster = SlurmCluster(root, _write_conf(root, node, os.cpu_count() or 1, mem), node, os.cpu_count() or 1)
    cluster.run("slurmctld", "-c", "-f", str(cluster.conf))  # -c: clean start, no old state
    cluster.run("slurmd", "-f", str(cluster.conf))
    try:
        _wait_idle(cluster)
        yield cluster
    finally:
        for daemon in ("slurmd", "slurmctld"):
            pid_file = root / f"{daemon}.pid"
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass


def _wait_idle(cluster: SlurmCluster, timeout: float = 30) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        proc = cluster.run("sinfo", "-h", "-o", "%t", check=False)
        if proc.returncode == 0 and proc.stdout.strip() in ("idle", "mix", "alloc"):
            return
        time.sleep(0.5)
    raise AssertionError(f"SLURM node not idle after {timeout}s\n{cluster.log('slurmctld')[-2000:]}"
                         f"\n{cluster.log('slurmd')[-2000:]}")
