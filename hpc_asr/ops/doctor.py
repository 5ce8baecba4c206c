"""Check a node (or a whole allocation) before spending GPU hours: ``python -m hpc_asr doctor``.

    mpirun -np 16 -H node1:8,node2:8 python -m hpc_asr doctor --data /lustre/asr/fbank/train
    srun --mpi=pmix python -m hpc_asr doctor --data ... --config my.yaml

Runs under the same launcher as training. Every rank checks its own node (versions, GPUs against
local ranks, NCCL variables, free disk); the ranks then run a real allreduce through the engine
training will use (``--engine``, else ``--config``'s ``dist.engine``, else what the launcher
implies) on the device training will use (the GPU when there is one, so NCCL is what gets
checked), and time it. Rank 0 prints one line per check, ``PASS`` / ``WARN`` / ``FAIL`` with the
fix, or ``SKIP`` with the reason for a check that does not apply (the Horovod build on a site that
trains with the torch engine), and every rank exits 1 when anything failed. The source article's
troubleshooting list (slow gradient sync, out of memory, I/O bottleneck, unstable convergence) is
turned into checks where the environment shows the cause, and advice otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hpc_asr.cli import load_config
from hpc_asr.dist.launch import World, detect_launcher, detect_world, resolve_engine

__all__ = ["Check", "allreduce_check", "doctor_engine", "horovod_build_checks", "main", "node_checks", "sync_check"]

NETWORK_FS = ("lustre", "nfs", "nfs4", "gpfs", "beegfs", "cifs", "fuse.sshfs")


@dataclass(frozen=True)
class Check:
    status: str  # pass | warn | fail | skip (does not apply here; detail says why)
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f"  -> {self.fix}" if self.fix and self.status != "pass" else ""
        return f"{self.status.upper():4s}  {self.name:22s} {self.detail}{fix}"


def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix in /proc/mounts)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for row in mounts:
        parts = row.split()
        if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")) \
                and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind


# ---- versions and GPUs ---------------------------------------------------------------------

def version_checks(expect_gpu: bool) -> list[Check]:
    import torch

    out = [Check("pass" if sys.version_info >= (3, 10) else "fail", "python", platform.python_version(),
                 "hpc_asr needs Python >= 3.10: load a newer python module"),
           Check("pass", "torch", torch.__version__)]
    if not torch.cuda.is_available():
        out.append(Check("fail" if expect_gpu else "warn", "cuda",
                         f"no CUDA GPU visible on {socket.gethostname()} (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}): training runs on CPU",
                         "on GPU nodes request GPUs (--gpus-per-node), load the cuda module, check "
                         "CUDA_VISIBLE_DEVICES and that torch is a CUDA build (env/provision.sh --gpu)"))
        return out
    cudnn = torch.backends.cudnn.version()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    out += [Check("pass", "cuda", f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"),
            Check("pass" if cudnn else "warn", "cudnn", str(cudnn), "install a torch build with cuDNN"),
            Check("pass", "nccl", nccl)]
    return out


def gpu_rank_checks(world: World) -> list[Check]:
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        return [Check("pass", "gpus/local ranks", f"0 GPUs, {world.local_size} local ranks (CPU training)")]
    if world.local_size > gpus:
        return [Check("fail", "gpus/local ranks", f"{world.local_size} ranks share {gpus} GPUs on this node",
                      f"launch {gpus} ranks per node (--ntasks-per-node={gpus} / mpiprocs={gpus})")]
    if world.local_size < gpus:
        return [Check("warn", "gpus/local ranks", f"{world.local_size} ranks for {gpus} GPUs: some sit idle",
                      f"launch {gpus} ranks per node")]
    return [Check("pass", "gpus/local ranks", f"{gpus} GPUs, one per local rank")]


def horovod_build_checks(flags: dict[str, bool] | None, gpus: int, engine: str = "horovod") -> list[Check]:
    """``flags``: {'mpi','gloo','nccl'} from horovod.torch's *_built(); None = not importable.
    Under ``engine`` torch Horovod is not used: one SKIP line saying so."""
    if engine != "horovod":
        state = "not installed" if flags is None else "installed"
        return [Check("skip", "horovod", f"not used: training runs with dist.engine {engine} (Horovod {state})")]
    rebuild = "rebuild Horovod with env/setup-local.sh (HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1)"
    if flags is None:
        return [Check("fail", "horovod", "horovod.torch does not import", f"module load hpc_asr, or {rebuild}")]
    out = [Check("pass" if flags["mpi"] else "fail", "horovod MPI",
                 "built with MPI" if flags["mpi"] else "built WITHOUT MPI: mpirun/srun ranks cannot rendezvous",
                 rebuild),
           Check("pass" if flags["gloo"] else "warn", "horovod Gloo",
                 "built with Gloo" if flags["gloo"] else "built without Gloo (horovodrun --gloo unavailable)",
                 rebuild)]
    if gpus:
        out.append(Check("pass" if flags["nccl"] else "fail", "horovod NCCL",
                         "GPU allreduce over NCCL" if flags["nccl"] else "no NCCL: GPU gradients go through MPI",
                         "env/provision.sh --gpu (HOROVOD_GPU_OPERATIONS=NCCL)"))
    else:
        out.append(Check("pass", "horovod NCCL", f"{'built' if flags['nccl'] else 'not built'}; not used on CPU"))
    return out


# ---- environment, data and disks -----------------------------------------------------------

def nccl_checks(gpus: int, nodes: int) -> list[Check]:
    env = os.environ
    shown = " ".join(f"{k}={env[k]}" for k in sorted(env) if k.startswith("NCCL_")) or "none set"
    if not gpus:
        return [Check("pass", "nccl env", f"not used without GPUs ({shown})")]
    out = []
    if env.get("NCCL_IB_DISABLE") == "1":
        out.append(Check("warn", "nccl env", "NCCL_IB_DISABLE=1: inter-node traffic over TCP sockets",
                         "unset it or set NCCL_IB_DISABLE=0 (env/nccl.env)"))
    if nodes > 1 and "NCCL_SOCKET_IFNAME" not in env:
        out.append(Check("warn", "nccl env", "NCCL_SOCKET_IFNAME unset: NCCL may pick a slow interface",
                         "export NCCL_SOCKET_IFNAME (env/nccl.env has ^lo,docker0)"))
    return out or [Check("pass", "nccl env", shown)]


def data_checks(data: Path | None) -> list[Check]:
    if data is None:
        return [Check("warn", "data", "no --data given: data directory not checked",
                      "pass --data <prepared feature directory>")]
    if not data.is_dir():
        return [Check("fail", "data", f"{data}: directory does not exist",
                      "prepare features (python -m hpc_asr prep fbank --manifest ... --out DIR) or fix --data")]
    if not (data / "index.json").is_file():
        return [Check("fail", "data", f"{data}: no index.json (prep unfinished or not a feature directory)",
                      "re-run python -m hpc_asr prep fbank for this split")]
    try:
        from hpc_asr.data.loader import FeatureSet

        fs = FeatureSet(data)
        first = fs[0] if len(fs) else None
    except Exception as e:  # any unreadable shard is a failed check, not a traceback
        return [Check("fail", "data", f"{data}: cannot read ({type(e).__name__}: {e})",
                      "re-run python -m hpc_asr prep fbank --force for this split")]
    ok = first is not None
    return [Check("pass" if ok else "fail", "data", f"{data}: {len(fs)} utterances, "
                  f"{fs.index.get('hours', 0):.2f} h, readable", "the index lists no utterances: re-run prep")]


def fs_checks(data: Path | None) -> list[Check]:
    where = data if data is not None and data.exists() else Path.cwd()
    kind = _fs_type(where)
    locking = os.environ.get("HDF5_USE_FILE_LOCKING", "")
    out = []
    if kind == "lustre":
        out.append(Check("pass" if locking.upper() == "FALSE" else "fail", "hdf5 locking",
                         f"HDF5_USE_FILE_LOCKING={locking or '(unset)'} on Lustre",
                         "export HDF5_USE_FILE_LOCKING=FALSE (the hpc_asr module sets it)"))
        if shutil.which("lfs") is None:
            out.append(Check("warn", "lustre striping", f"{where} is on Lustre but `lfs` is not on PATH",
                             "load the lustre client tools to check striping"))
        else:
            proc = subprocess.run(["lfs", "getstripe", "-c", "-d", str(where)], capture_output=True, text=True)
            count = proc.stdout.strip()
            out.append(Check("pass" if count not in ("1", "") else "warn", "lustre striping",
                             f"stripe count {count or '?'} on {where}",
                             f"lfs setstripe -c 4 {where} before writing large shards"))
    else:
        out.append(Check("pass", "hdf5 locking", f"{where} on {kind}, not Lustre (locking "
                                                 f"{locking or 'default'} is fine)"))
        out.append(Check("pass", "lustre striping", f"not on Lustre ({kind}): nothing to stripe"))
    return out


def disk_checks(data: Path | None, local: Path) -> list[Check]:
    out = []
    shared = data if data is not None and data.exists() else Path.cwd()
    need = sum(p.stat().st_size for p in shared.rglob("*") if p.is_file()) if data is not None and \
        data.exists() else 0
    for name, path, want in (("disk shared", shared, 10e9), ("disk node-local", local, max(need * 1.1, 5e9))):
        free = shutil.disk_usage(path).free
        status = "pass" if free >= want else "warn"
        out.append(Check(status, name, f"{free / 1e9:.1f} GB free on {path}" + (
            f" (data {need / 1e9:.2f} GB)" if name.endswith("local") and need else ""),
            "free space or point checkpoints/staging elsewhere (site.yaml local_scratch)"))
    return out


def troubleshooting_checks(world: World, data: Path | None, gpus: int) -> list[Check]:
    """The article's list: slow gradient sync, out of memory, I/O bottleneck, unstable convergence."""
    out = []
    mem = {k: int(v.split()[0]) * 1024 for k, v in (r.split(":", 1) for r in
                                                     Path("/proc/meminfo").read_text().splitlines())}
    per_rank = mem.get("MemAvailable", 0) / max(world.local_size, 1)
    out.append(Check("pass" if per_rank >= 2e9 else "warn", "out of memory",
                     f"{per_rank / 1e9:.1f} GB host RAM available per local rank",
                     "lower data.max_frames / data.max_utts, or fewer ranks per node; on GPU use train.amp true"))
    kind = _fs_type(data) if data is not None and data.exists() else "unknown"
    if kind in NETWORK_FS:
        out.append(Check("warn", "i/o bottleneck", f"training data on {kind}: every rank reads the shared FS",
                         "render jobs with --stage (copies shards to node-local disk once per node)"))
    else:
        out.append(Check("pass", "i/o bottleneck", f"data on {kind} (node-local or no data given)"))
    out.append(Check("pass", "unstable convergence", f"advice: {world.size} ranks multiply the global batch; "
                     "keep warmup (train.warmup_steps) and scale the LR deliberately, and watch train.rank0.log "
                     "for NaN/inf losses"))
    return out


def horovod_flags() -> dict[str, bool] | None:
    """Which transports the installed Horovod was built with; None when it does not import."""
    try:
        import horovod.torch as hvd
    except ImportError:
        return None
    return {"mpi": bool(hvd.mpi_built()), "gloo": bool(hvd.gloo_built()), "nccl": bool(hvd.nccl_built())}


def doctor_engine(requested: str, flags: dict[str, bool] | None, launcher: str) -> str:
    """The engine training would use here (horovod | torch): ``auto`` resolves as for a multi-rank
    launch, with Horovod counted as present only when it imports, so one rank checks it too."""
    if requested != "auto":
        return requested
    return resolve_engine("auto", launcher, World(0, 2), have_horovod=flags is not None)


def node_checks(world: World, data: Path | None, expect_gpu: bool,
                flags: dict[str, bool] | None, engine: str) -> tuple[list[Check], int]:
    import torch

    gpus = torch.cuda.device_count()
    local = Path(os.environ.get("TMPDIR") or "/tmp")
    checks = version_checks(expect_gpu) + gpu_rank_checks(world) + horovod_build_checks(flags, gpus, engine)
    return checks + data_checks(data) + fs_checks(data) + disk_checks(data, local), gpus


# ---- a real allreduce ----------------------------------------------------------------------

def sync_check(busbw: float, gpus: int, nodes: int) -> Check:
    """Slow gradient sync: GPU jobs across nodes want InfiniBand-class allreduce bandwidth."""
    if gpus and nodes > 1 and busbw < 5.0:
        return Check("warn", "slow gradient sync", f"allreduce bus bandwidth {busbw:.2f} GB/s across {nodes} "
                     "nodes (IB HDR gives ~20 GB/s)", "check NCCL_IB_DISABLE/NCCL_SOCKET_IFNAME (env/nccl.env), "
                     "keep dist.compression fp16, NCCL_DEBUG=INFO shows the transport NCCL picked")
    return Check("pass", "slow gradient sync", f"allreduce {busbw:.2f} GB/s; advice: keep dist.compression fp16; "
                 "on CPU nodes hpc_asr sets OMPI_MCA_mpi_yield_when_idle=1 and HOROVOD_CYCLE_TIME=5")


def allreduce_check(engine, mb: float = 16.0, iters: int = 5) -> tuple[Check, float]:
    """Sum a ``mb`` MB float32 tensor over all ranks through ``engine`` on ``engine.device``: the
    GPU when there is one (NCCL, what GPU training reduces over), else the CPU (MPI/Gloo); verify
    and time it."""
    import torch

    size, device = engine.world.size, engine.device
    n = int(mb * 1e6 / 4)
    x = torch.full((n,), float(engine.world.rank + 1), device=device)
    expect = size * (size + 1) / 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    engine.allreduce_sum(x[:1024])  # dist: warm-up (connections, NCCL communicators)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        y = engine.allreduce_sum(x)  # dist
    sync()
    dt = max(engine.gather_object((time.perf_counter() - t0) / iters))  # dist: the slowest rank
    ok = bool(torch.all(y == expect))
    busbw = 2 * (size - 1) / size * n * 4 / dt / 1e9 if size > 1 else 0.0
    detail = (f"{mb:.0f} MB over {size} ranks on {device} ({engine.name}): {dt * 1e3:.1f} ms, bus bandwidth "
              f"{busbw:.2f} GB/s, sum {'correct' if ok else f'WRONG ({float(y[0])} != {expect})'}")
    return Check("pass" if ok else "fail", "allreduce", detail,
                 f"ranks disagree: check that all ranks run the same {engine.name} build"), busbw


def _allreduce(engine_name: str, mb: float, checks: list[Check], world: World, gpus: int, nodes: int) -> list[Check]:
    """The allreduce and sync checks, through the engine training will use, or why not."""
    if engine_name == "horovod":
        mpi_ok = any(c.name == "horovod MPI" and c.status == "pass" for c in checks)
        if not (mpi_ok or (world.size == 1 and any(c.name == "horovod Gloo" for c in checks))):
            return [Check("fail", "allreduce", "not run: Horovod cannot use this launcher's MPI",
                          "fix the horovod checks above")]
    from hpc_asr.dist.engines import make_engine

    engine = make_engine(engine_name)  # dist: rendezvous (one rank too: it checks the same path)
    try:
        check, busbw = allreduce_check(engine, mb)
    finally:
        engine.shutdown()
    return [check, sync_check(busbw, gpus, nodes)]


# ---- driver --------------------------------------------------------------------------------

def _merge(per_rank: list[list[Check]], hosts: list[str]) -> list[Check]:
    """One line per distinct result; results that differ between ranks name their host/rank."""
    seen: dict[tuple, list[int]] = {}
    for r, checks in enumerate(per_rank):
        for c in checks:
            seen.setdefault((c.status, c.name, c.detail, c.fix), []).append(r)
    out = []
    for (status, name, detail, fix), ranks in seen.items():
        if len(ranks) < len(per_rank):
            detail = f"[{', '.join(f'{hosts[r]}/{r}' for r in ranks)}] {detail}"
        out.append(Check(status, name, detail, fix))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="prepared feature directory training will read")
    p.add_argument("--expect-gpu", action="store_true", help="no GPU is a failure, not a warning")
    p.add_argument("--allreduce-mb", type=float, default=16.0)
    p.add_argument("--config", help="training config: its dist.engine is the engine checked")
    p.add_argument("--engine", choices=["auto", "horovod", "torch"], help="engine to check (wins over --config)")
    args = p.parse_args(argv)
    world = detect_world()
    comm = None
    if world.size > 1:
        from hpc_asr.dist.launch import mpi_comm

        comm = mpi_comm()
    requested = args.engine or (load_config(args.config).dist.engine if args.config else "auto")
    flags = horovod_flags()
    engine = doctor_engine(requested, flags, detect_launcher())
    checks, gpus = node_checks(world, args.data, args.expect_gpu, flags, engine)
    nodes = len(set(comm.allgather(socket.gethostname()))) if comm else 1  # dist
    checks += nccl_checks(gpus, nodes)
    checks += _allreduce(engine, args.allreduce_mb, checks, world, gpus, nodes)
    checks += troubleshooting_checks(world, args.data, gpus)
    gathered = comm.gather(checks, root=0) if comm else [checks]  # dist
    hosts = comm.gather(socket.gethostname(), root=0) if comm else [socket.gethostname()]  # dist
    failed = False
    if world.rank == 0:
        merged = _merge(gathered, hosts)
        print(f"hpc_asr doctor: {world.size} rank(s) on {nodes} node(s)")
        for c in merged:
            print(c.line())
        counts = {s: sum(c.status == s for c in merged) for s in ("pass", "warn", "skip", "fail")}
        failed = counts["fail"] > 0
        print(f"{counts['pass']} pass, {counts['warn']} warn, {counts['skip']} skip, {counts['fail']} fail")
        sys.stdout.flush()
    if comm:
        failed = comm.bcast(failed, root=0)  # dist: every rank exits with the same status
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
