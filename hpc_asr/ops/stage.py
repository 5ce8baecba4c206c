"""Node-local staging: copy prepared feature directories from the shared filesystem to local disk.

    srun --ntasks-per-node=1 python -m hpc_asr stage --dest $TMPDIR/hpc_asr-$SLURM_JOB_ID fbank/train fbank/dev

Reading HDF5 shards from Lustre with every rank of every node is the I/O bottleneck the source
article warns about; a job copies them once per node to NVMe and trains on the copy. Any number
of processes per node may call this: the first to take ``DEST/.lock`` copies, the others wait on
the lock and find the copy done. Every file's size and SHA-256 is checked against the source
before the copy is published (renamed into place); a later call whose source is unchanged
(same names, sizes, mtimes) reuses it, so a requeued job on the same node copies nothing.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from hpc_asr.atomic import atomic_path, remove_stale

__all__ = ["StageError", "stage", "stage_dir"]

MARKER = ".staged.json"


class StageError(RuntimeError):
    """Source missing or a copy that does not match its source."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _listing(src: Path) -> dict[str, list]:
    """relative path → [size, mtime_ns] for every regular file under a feature directory (shards
    may sit in sub-directories); hidden files (locks, partial writes) are left out."""
    rows = {}
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = p.stat()
            rows[rel.as_posix()] = [st.st_size, st.st_mtime_ns]
    return rows


def _is_current(dest: Path, listing: dict) -> bool:
    marker = dest / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("source") == listing
    except ValueError:
        return False


def stage_dir(src: Path, dest: Path) -> dict:
    """Copy ``src`` to ``dest`` (caller holds the lock); verify, then rename into place."""
    if not (src / "index.json").is_file():
        raise StageError(f"{src}: not a prepared feature directory (no index.json)")
    listing = _listing(src)
    if _is_current(dest, listing):
        return {"src": str(src), "dest": str(dest), "copied": 0, "bytes": 0, "reused": True}
    remove_stale(dest)  # copies of killed stagers (we hold the node's lock)
    with atomic_path(dest) as tmp:
        sums = _copy_verified(src, tmp, listing)
        (tmp / MARKER).write_text(json.dumps({"source": listing, "sha256": sums, "from": str(src)}))
    total = sum(size for size, _ in listing.values())
    return {"src": str(src), "dest": str(dest), "copied": len(listing), "bytes": total, "reused": False}


def _copy_verified(src: Path, tmp: Path, listing: dict) -> dict[str, str]:
    """Copy every listed file into ``tmp``, checking size and SHA-256; returns the sums."""
    tmp.mkdir(parents=True)
    sums = {}
    for name, (size, _) in listing.items():
        src_sum = _sha256(src / name)
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, tmp / name)
        got_size, got_sum = (tmp / name).stat().st_size, _sha256(tmp / name)
        if got_size != size or got_sum != src_sum:
            raise StageError(f"{tmp / name}: copy differs from {src / name} "
                             f"(size {got_size} vs {size}, sha256 {got_sum[:12]} vs {src_sum[:12]})")
        sums[name] = src_sum
    return sums


def stage(srcs: list[Path], dest_root: Path) -> list[dict]:
    """Stage each source directory to ``dest_root/<name>`` once per node (file lock)."""
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise StageError(f"sources share a directory name: {names}")
    for s in srcs:
        if not s.is_dir():
            raise StageError(f"{s}: source directory not found")
    dest_root.mkdir(parents=True, exist_ok=True)
    with open(dest_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copier per node; the others block here
        return [stage_dir(s.resolve(), dest_root / s.name) for s in srcs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dest", required=True, type=Path, help="node-local directory ($TMPDIR/...)")
    p.add_argument("src", nargs="+", type=Path, help="prepared feature directories on the shared filesystem")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        rows = stage(args.src, args.dest)
    except (StageError, OSError) as e:
        print(f"error: staging: {e}", file=sys.stderr)
        return 2
    for r in rows:
        what = "up to date" if r["reused"] else f"{r['copied']} files, {r['bytes'] / 1e6:.1f} MB, sha256 verified"
        print(f"[stage] {os.uname().nodename}: {r['src']} -> {r['dest']} ({what})", file=sys.stderr)
    print(f"[stage] done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
