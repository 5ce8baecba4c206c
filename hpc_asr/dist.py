"""Launcher/rank detection and the distributed engines. Nothing else reads rank variables.

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: prep tools use detect_world() without it
    import torch

    from hpc_asr.config import DistConfig

__all__ = ["Engine", "HorovodKnobs", "LaunchError", "World", "compute_threads", "detect_launcher", "detect_world",
           "host_address", "log0", "make_engine", "mpi_comm", "resolve_engine", "torch_backend"]

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


class Engine:
    """Single-process engine; the base for the distributed ones."""

    name = "none"

    def __init__(self, world: World, compression: str = "none"):
        self.world = world
        self.compression = compression
        self.device = self._pick_device()

    def _pick_device(self) -> torch.device:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(self.world.local_rank % torch.cuda.device_count())  # pin one GPU per rank
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --- model / optimizer wiring -------------------------------------------------------
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def wrap_optimizer(self, optimizer, model: torch.nn.Module, accum_steps: int):
        return optimizer

    def broadcast_state(self, model: torch.nn.Module, optimizer) -> None:
        """Make every rank start from rank 0's (possibly resumed) weights and optimizer state."""

    def average_batchnorm_stats(self, model: torch.nn.Module) -> None:
        """BatchNorm running statistics are updated on each rank from its own batches, so the
        replicas drift apart in them (weights do not: gradients are allreduced). Average them over
        the ranks in one allreduce (timm's ``distribute_bn``), so evaluation, every checkpoint and
        every replica hold the statistics of all ranks' data. Every rank must call it."""
        import torch

        bufs = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for b in (m.running_mean, m.running_var) if b is not None]
        if self.world.size == 1 or not bufs:
            return
        with torch.no_grad():
            flat = torch.cat([b.reshape(-1).to(torch.float64) for b in bufs])
            flat = self.allreduce_sum(flat) / self.world.size  # dist: the same sum on every rank
            for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
                b.copy_(v.view_as(b))

    def synchronize(self, optimizer) -> None:
        """Finish the gradient allreduce before the optimizer step (needed to unscale/clip)."""

    def skip_synchronize(self, optimizer):
        return contextlib.nullcontext()

    def no_sync(self, model: torch.nn.Module):
        """Context for accumulation micro-steps that must not communicate."""
        return contextlib.nullcontext()

    # --- collectives on small tensors (metrics, flags); any device and dtype ------------
    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_object(self, obj):
        return obj

    def gather_object(self, obj) -> list:
        """Every rank's ``obj`` in rank order (on every rank; results are small)."""
        return [obj]

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@dataclass(frozen=True)
class HorovodKnobs:
    """Horovod settings read at ``hvd.init()``; see ``DistConfig`` for their meaning."""

    fusion_threshold_mb: float = 0.0
    cycle_time_ms: float = 0.0
    hierarchical_allreduce: bool = False
    timeline: str = ""
    gradient_predivide_factor: float = 0.0

    def environment(self, cuda: bool) -> dict[str, str]:
        """HOROVOD_* variables to set before ``hvd.init()`` (the caller's environment wins)."""
        env: dict[str, str] = {}
        if not cuda:
            # On CPU nodes Horovod's background thread shares cores with the compute threads; an
            # MPI that busy-polls while waiting starves them (measured: 2 ranks on 2 cores train
            # 1.7x faster with yielding). Read at MPI_Init, so set before hvd.init().
            env["OMPI_MCA_mpi_yield_when_idle"] = "1"
        cycle = self.cycle_time_ms or (0.0 if cuda else 5.0)  # 0 = Horovod's default (1 ms)
        if cycle:
            env["HOROVOD_CYCLE_TIME"] = f"{cycle:g}"
        if self.fusion_threshold_mb:
            env["HOROVOD_FUSION_THRESHOLD"] = str(int(self.fusion_threshold_mb * 2**20))
        if self.hierarchical_allreduce:
            env["HOROVOD_HIERARCHICAL_ALLREDUCE"] = "1"
        if self.timeline:
            env["HOROVOD_TIMELINE"] = os.path.abspath(self.timeline)
        return env


def _elastic_state_class():
    """``TorchState`` whose sync broadcasts the optimizer state at lr 0. Horovod's
    ``broadcast_optimizer_state`` takes a dummy step with zero gradients on a rank whose optimizer
    has no state yet (a rank that joins): AdamW's weight decay would shrink that rank's weights
    only, after the model was broadcast, and the replicas would differ from then on."""
    from horovod.torch import broadcast_object
    from horovod.torch.elastic import TorchState

    class _State(TorchState):
        def sync(self):
            groups = self._handlers["optimizer"].value.param_groups
            lrs = broadcast_object([g["lr"] for g in groups], root_rank=0)  # dist: rank 0's lrs
            for g in groups:
                g["lr"] = 0.0
            super().sync()  # dist: model, optimizer state and counters from rank 0
            for g, lr in zip(groups, lrs, strict=True):
                g["lr"] = lr

    return _State


class HorovodEngine(Engine):
    name = "horovod"

    def __init__(self, world: World, compression: str, knobs: HorovodKnobs | None = None):
        import torch

        self.knobs = knobs or HorovodKnobs()
        for key, value in self.knobs.environment(torch.cuda.is_available()).items():
            os.environ.setdefault(key, value)  # read at hvd.init(); the user's environment wins
        import horovod.torch as hvd

        hvd.init()  # dist: rendezvous over MPI (mpirun/srun) or Gloo (horovodrun)
        self.hvd = hvd
        real = World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
        if real.size != world.size and os.environ.get("HOROVOD_ELASTIC") != "1":
            raise LaunchError(f"the launcher started {world.size} ranks but Horovod sees {real.size} "
                              f"(a Horovod built without this launcher's MPI/Gloo?): check "
                              f"`horovodrun --check-build`, or pass --dist.engine torch", world.rank)
        super().__init__(real, compression)
        self.elastic = os.environ.get("HOROVOD_ELASTIC") == "1"  # horovodrun --min-np/--max-np

    def predivide_factor(self) -> float:
        """Gradients are divided by this before the sum and by size/this after it. With fp16 on
        the wire the default is the world size: an fp16 *sum* of N gradients overflows at 65504
        where their average does not."""
        factor = self.knobs.gradient_predivide_factor
        return factor or (float(self.world.size) if self.compression == "fp16" else 1.0)

    def wrap_optimizer(self, optimizer, model, accum_steps):
        hvd = self.hvd
        comp = hvd.Compression.fp16 if self.compression == "fp16" else hvd.Compression.none
        return hvd.DistributedOptimizer(  # dist: ring-allreduce of gradients, fp16 on the wire
            optimizer,
            named_parameters=model.named_parameters(),
            compression=comp,
            backward_passes_per_step=accum_steps,
            op=hvd.Average,
            gradient_predivide_factor=self.predivide_factor(),
        )

    def elastic_state(self, model, optimizer, **counters):
        """``hvd.elastic.TorchState`` for ``horovodrun --min-np/--max-np --host-discovery-script``:
        when ranks leave or join, every rank rolls back to the last ``state.commit()`` (model,
        optimizer, ``counters``) and ``self.world`` follows the new ranks."""
        state = _elastic_state_class()(model=model, optimizer=optimizer, **counters)
        state.register_reset_callbacks([self._refresh_world])
        return state

    def elastic_run(self, fn):
        """Decorator: run ``fn(state)``, restarting it from the last commit after each reset."""
        return self.hvd.elastic.run(fn)

    def _refresh_world(self) -> None:
        hvd = self.hvd
        self.world = World(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())

    def broadcast_state(self, model, optimizer):
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # dist
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)  # dist

    def synchronize(self, optimizer):
        optimizer.synchronize()  # dist

    def skip_synchronize(self, optimizer):
        return optimizer.skip_synchronize()

    def allreduce_sum(self, t):
        import torch

        src = t.to(torch.int64) if t.dtype == torch.bool else t  # Horovod has no bool; a sum of flags is a count
        return self.hvd.allreduce(src, op=self.hvd.Sum)  # dist

    def broadcast_object(self, obj):
        return self.hvd.broadcast_object(obj, root_rank=0)  # dist

    def gather_object(self, obj):
        return self.hvd.allgather_object(obj)  # dist

    def barrier(self):
        self.hvd.barrier()  # dist

    def shutdown(self):
        self.hvd.shutdown()  # dist


def torch_backend(cuda_available: bool) -> str:
    """torch.distributed backend string: Gloo for CPU tensors, plus NCCL for CUDA ones on GPUs, so
    metrics on the CPU and gradients on the GPU both have a backend that takes them."""
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


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


def _rendezvous_store(world: World, timeout: timedelta) -> tuple[Any, tuple[str, int]]:
    """A TCPStore served by rank 0 on a port it binds itself (port 0: the kernel picks a free one
    and it stays bound, so nothing can take it before use); its address goes to the others over
    MPI. ``MASTER_ADDR``/``MASTER_PORT`` from the environment are used when given."""
    from torch.distributed import TCPStore

    addr = os.environ.get("MASTER_ADDR") or host_address()
    port = int(os.environ.get("MASTER_PORT", "0"))
    store = None
    if world.rank == 0:
        store = TCPStore(addr, port, world.size, True, timeout, wait_for_workers=False)
        port = store.port
    if world.size > 1:
        comm = mpi_comm()
        if comm.Get_size() != world.size:
            raise LaunchError(f"the torch engine found no MPI world of {world.size} ranks to share rank 0's "
                              f"address over: set MASTER_ADDR and MASTER_PORT, or launch with torchrun",
                              world.rank)
        addr, port = comm.bcast((addr, port), root=0)  # dist: rank 0's reachable address + bound port
    if store is None:
        store = TCPStore(addr, port, world.size, False, timeout)
    return store, (addr, port)


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was in a broadcast state dict: its index in the tensor list and layout."""

    index: int
    shape: tuple[int, ...]
    dtype: Any
    device_type: str


def _split_tensors(obj, tensors: list) -> Any:
    """``obj`` with every tensor replaced by a ``_Slot`` (appending the tensor to ``tensors``)."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), obj.dtype, obj.device.type)
    if isinstance(obj, dict):
        return {k: _split_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split_tensors(v, tensors) for v in obj)
    return obj


def _slots(obj) -> list[_Slot]:
    """Every ``_Slot`` in ``obj``, in index order."""
    if isinstance(obj, _Slot):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sorted((s for v in values for s in _slots(v)), key=lambda s: s.index)


def _join_tensors(obj, tensors: list) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join_tensors(v, tensors) for v in obj)
    return obj


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, world: World, compression: str, timeout_s: float = 600.0):
        import torch
        import torch.distributed as td

        super().__init__(world, compression)
        self.td = td
        self.backend = torch_backend(torch.cuda.is_available())
        self._comm_types = {"cpu", "cuda"} if "nccl" in self.backend else {"cpu"}
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:  # torchrun, or set by the user
            self.rendezvous = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
            td.init_process_group(self.backend, rank=world.rank, world_size=world.size, timeout=timeout)  # dist
        else:  # mpirun/srun set neither: rank 0 serves the store itself
            store, self.rendezvous = _rendezvous_store(world, timeout)  # dist
            td.init_process_group(self.backend, store=store, rank=world.rank, world_size=world.size,
                                  timeout=timeout)  # dist

    def wrap_model(self, model):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)  # dist
        if self.compression == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)  # dist: fp16 on the wire
        return ddp

    def _comm_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``t`` on a device the backend takes (NCCL: CUDA only; Gloo: CPU)."""
        import torch

        device = t.device if t.device.type in self._comm_types else self.device
        dtype = torch.int64 if t.dtype == torch.bool else t.dtype  # a sum of flags is a count
        return t.detach().to(device=device, dtype=dtype, copy=True).contiguous()

    def broadcast_state(self, model, optimizer):
        """Rank 0's weights and optimizer state, tensor by tensor onto each rank's own device (a
        pickled state dict would land on rank 0's device, e.g. cuda:0, on every rank)."""
        import torch

        with torch.no_grad():
            for t in model.state_dict().values():
                buf = self._comm_copy(t)
                self.td.broadcast(buf, src=0)  # dist
                t.copy_(buf)
        tensors: list = []
        skeleton = _split_tensors(optimizer.state_dict(), tensors) if self.world.is_main else None
        skeleton = self.broadcast_object(skeleton)  # dist: structure and hyper-parameters, no tensors
        out = []
        for slot in _slots(skeleton):
            src = tensors[slot.index] if self.world.is_main else torch.empty(slot.shape, dtype=slot.dtype,
                                                                             device=self.device)
            buf = self._comm_copy(src)
            self.td.broadcast(buf, src=0)  # dist
            out.append(buf.to(device="cpu" if slot.device_type == "cpu" else self.device, dtype=slot.dtype))
        optimizer.load_state_dict(_join_tensors(skeleton, out))

    def no_sync(self, model):
        return model.no_sync()

    def allreduce_sum(self, t):
        buf = self._comm_copy(t)
        self.td.all_reduce(buf)  # dist
        return buf.to(t.device)

    def broadcast_object(self, obj):
        box = [obj]
        self.td.broadcast_object_list(box, src=0)  # dist
        return box[0]

    def gather_object(self, obj):
        out = [None] * self.world.size
        self.td.all_gather_object(out, obj)  # dist
        return out

    def barrier(self):
        self.td.barrier()  # dist

    def shutdown(self):
        self.td.destroy_process_group()  # dist


def _cpus() -> set[int]:
    """The CPUs this process may run on (its scheduler affinity), not all the host's cores."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def compute_threads(configured: int = 0, engine: Engine | None = None, env: dict[str, str] | None = None) -> int:
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


def make_engine(spec: str | DistConfig = "auto", compression: str | None = None) -> Engine:
    """The engine for a ``DistConfig`` (or an engine name), checked against the launched world."""
    if isinstance(spec, str):
        name, knobs = spec, HorovodKnobs()
    else:
        name, compression = spec.engine, compression or spec.compression
        knobs = HorovodKnobs(spec.fusion_threshold_mb, spec.cycle_time_ms, spec.hierarchical_allreduce,
                             spec.timeline, spec.gradient_predivide_factor)
    compression = compression or "none"
    world = detect_world()
    if not isinstance(spec, str) and spec.elastic:
        if os.environ.get("HOROVOD_ELASTIC") != "1":
            raise LaunchError("dist.elastic is true but this process was not started by an elastic horovodrun: "
                              "launch with horovodrun --min-np N --max-np M --host-discovery-script SCRIPT, "
                              "or pass --dist.elastic false", world.rank)
        return HorovodEngine(world, compression, knobs)  # even on one rank: others may join
    name = resolve_engine(name, detect_launcher(), world)
    if name == "horovod":
        return HorovodEngine(world, compression, knobs)
    if name == "torch":
        return TorchEngine(world, compression)
    return Engine(world, compression)
