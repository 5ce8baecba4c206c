"""The distributed engines: ``none`` (one process), ``horovod`` (ring-allreduce; NCCL on GPUs, MPI
or Gloo on CPU) and ``torch`` (torch.distributed DDP; NCCL + Gloo). ``make_engine`` builds the one
the launcher implies (``hpc_asr.dist.launch`` decides which); every collective the toolkit runs goes
through an ``Engine``, so no other module talks to Horovod or torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from hpc_asr.dist.launch import LaunchError, World, detect_launcher, detect_world, host_address, mpi_comm, resolve_engine

if TYPE_CHECKING:  # torch is imported lazily
    import torch

    from hpc_asr.config import DistConfig

__all__ = ["Engine", "HorovodEngine", "HorovodKnobs", "TorchEngine", "make_engine", "torch_backend"]


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
        fresh = self.broadcast_object(not optimizer.state)  # dist: rank 0 holds no optimizer state yet
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # dist
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)  # dist
        if fresh:  # the dummy step Horovod took to create state to broadcast is no training step
            optimizer.state.clear()  # (AdamW's step count 1 would shrink the first real update by 1/4)

    def synchronize(self, optimizer):
        optimizer.synchronize()  # dist

    def skip_synchronize(self, optimizer):
        return optimizer.skip_synchronize()

    def allreduce_sum(self, t):
        import torch

        src = t.to(torch.int64) if t.dtype == torch.bool else t  # Horovod has no bool; a sum of flags is a count
        return self.hvd.allreduce(src, op=self.hvd.Sum)  # dist

    def broadcast_object(self, obj):
        # One name on every rank: Horovod's default is the object's type name, so rank 0 sending a dict
        # while the others pass None (the BPE tokenizer) named two different collectives and hung.
        return self.hvd.broadcast_object(obj, root_rank=0, name="hpc_asr.broadcast_object")  # dist

    def gather_object(self, obj):
        return self.hvd.allgather_object(obj, name="hpc_asr.gather_object")  # dist

    def barrier(self):
        self.hvd.barrier()  # dist

    def shutdown(self):
        self.hvd.shutdown()  # dist


def torch_backend(cuda_available: bool) -> str:
    """torch.distributed backend string: Gloo for CPU tensors, plus NCCL for CUDA ones on GPUs, so
    metrics on the CPU and gradients on the GPU both have a backend that takes them."""
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


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

        ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                  broadcast_buffers=False)  # dist: BatchNorm statistics stay each rank's own, as under Horovod
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
