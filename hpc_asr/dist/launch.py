"""Which launcher started this process and where this rank sits in the world. Nothing else reads
rank variables; the engines that talk over the world are in ``hpc_asr.dist.engines``.

Launchers covered: ``mpirun`` (OpenMPI, MPICH/Intel MPI), ``srun`` (SLURM, PMIx), ``horovodrun``
(Gloo), ``torchrun``, and plain ``python`` (one rank). Engines: ``horovod`` (ring-allreduce; NCCL
on GPUs, MPI or Gloo on CPU), ``torch`` (torch.distributed DDP; NCCL + Gloo) and ``none``;
``auto`` (the default) picks what the launcher implies: torchrun → torch, an MPI launcher or
horovodrun with more than one rank → horovod, one rank → none. An explicit engine that cannot
join the world the launcher started fails with one line naming what to pass instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["ENGINES", "LaunchError", "World", "compute_threads", "detect_launcher", "detect_world", "host_address",
           "log0", "mpi_comm", "resolve_engine"]

# (rank, size, local_rank, local_size) variables, most specific launcher first.
_LAUNCHER_VARS = [
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    # srun: the STEP variables exist only inside a job step; an sbatch script itself also has
    # SLURM_PROCID=0 and SLURM_NTASKS=N but is one process (checked on a real SLURM).
    ("PMIX_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
]
ENGINES = ("auto", "horovod", "torch", "none")


class LaunchError(SystemExit):
    """The engine asked for cannot join the world the launcher started. A ``SystemExit`` so that
    every CLI ends with the one-line message (on stderr, exit status 1) instead of a traceback."""

    def __init__(self, message: str, rank: int = 0):
        self.message = message
        # Every rank hits the same check; only rank 0 prints, so N ranks don't print N copies. The
        # others wait a moment: a launcher (torchrun) kills the job as soon as one rank exits.
        if rank != 0:
            time.sleep(3.0)
        super().__init__(f"error: {message}" if rank == 0 else 1)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"({self.rank}/{self.size})"


def detect_world(env: dict[str, str] | None = None) -> World:
    """Rank layout from the launcher's environment, without initialising any communication."""
    env = os.environ if env is None else env
    for rank_v, size_v, lrank_v, lsize_v in _LAUNCHER_VARS:
        if rank_v in env and size_v in env:
            size = int(env[size_v])
            local_size = env.get(lsize_v, "").split("(")[0].split(",")[0]  # SLURM: "4(x2)" / "4,4"
            return World(int(env[rank_v]), size, int(env.get(lrank_v, 0)), int(local_size or size))
    return World()


def detect_launcher(env: dict[str, str] | None = None) -> str:
    """Which launcher started this process: horovodrun | torchrun | mpirun | srun | python."""
    env = os.environ if env is None else env
    if "HOROVOD_RANK" in env:
        return "horovodrun"
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "MASTER_ADDR" in env and "OMPI_COMM_WORLD_RANK" not in env):
        return "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpirun"
    if "SLURM_STEP_NUM_TASKS" in env and ("PMIX_RANK" in env or "SLURM_PROCID" in env):
        return "srun"
    return "python"


def resolve_engine(name: str, launcher: str, world: World, have_horovod: bool | None = None) -> str:
    """The engine to build for ``name`` (``auto`` resolved), or a ``LaunchError`` saying what to
    pass when ``name`` cannot join the launched world (e.g. Horovod under torchrun)."""
    if name not in ENGINES:
        raise LaunchError(f"dist.engine must be one of {'|'.join(ENGINES)}, got {name!r}", world.rank)
    if have_horovod is None:
        have_horovod = importlib.util.find_spec("horovod") is not None
    n = world.size
    if name == "auto":
        if n == 1:
            return "none"
        return "horovod" if launcher != "torchrun" and have_horovod else "torch"
    problem = ""
    if name == "none" and n > 1:
        problem = (f"{launcher} started {n} ranks but the engine is 'none' (one process): pass "
                   f"--dist.engine auto (--engine auto for evaluate), or run it with plain python")
    elif name == "horovod" and launcher == "torchrun":
        problem = (f"torchrun started {n} ranks but Horovod cannot join a torchrun world (each process "
                   f"would be rank 0 of 1): pass --dist.engine torch (or auto), or launch with mpirun/srun")
    elif name == "torch" and launcher == "horovodrun" and "MASTER_ADDR" not in os.environ:
        problem = (f"horovodrun started {n} ranks without MPI, so the torch engine cannot find rank 0: "
                   f"pass --dist.engine horovod (or auto), or launch with mpirun/torchrun")
    if problem:
        raise LaunchError(problem, world.rank)
    return name


def mpi_comm():
    """mpi4py's COMM_WORLD, imported lazily so single-rank tools work where MPI is absent."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def log0(world: World, msg: str) -> None:
    """Progress goes to stderr from rank 0 only, so N ranks don't print N copies."""
    if world.is_main:
        print(msg, file=sys.stderr, flush=True)


def host_address() -> str:
    """An address other nodes can reach this host by: a non-loopback IP of the fully qualified name,
    else the IP of the interface that routes outwards, else the FQDN (short names often do not
    resolve on other nodes)."""
    fqdn = socket.getfqdn()
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(fqdn, None, socket.AF_INET, socket.SOCK_STREAM):
            if not sockaddr[0].startswith("127."):
                return sockaddr[0]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it only picks the route
        ip = s.getsockname()[0]
        if not ip.startswith(("127.", "0.")):
            return ip
    return fqdn


def _cpus() -> set[int]:
    """The CPUs this process may run on (its scheduler affinity), not all the host's cores."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def compute_threads(configured: int = 0, engine: Any = None, env: dict[str, str] | None = None) -> int:
    """Intra-op threads for this rank: ``configured`` when > 0; else ``OMP_NUM_THREADS`` when set;
    else the CPUs in this rank's affinity divided by the ranks on this host whose affinity overlaps
    it (mpirun --bind-to core gives each rank its own core; --bind-to none makes them share all).
    Under Horovod elastic: the affinity divided by the ranks on this host at start-up.

    With a multi-rank ``engine`` this is a collective (it gathers every rank's host and CPU set):
    call it on every rank."""
    if configured > 0:
        return configured
    env = os.environ if env is None else env
    omp = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "8,4" = nested levels: the first
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cpus = _cpus()
    sharing = 1
    if getattr(engine, "elastic", False):  # no collective here: a joining rank would wait alone
        sharing = engine.world.local_size
    elif engine is not None and engine.world.size > 1:
        host = socket.gethostname()
        everyone = engine.gather_object((host, sorted(cpus)))  # dist: who else runs on these CPUs
        sharing = sum(1 for h, theirs in everyone if h == host and cpus & set(theirs))
    return max(1, len(cpus) // max(1, sharing))
