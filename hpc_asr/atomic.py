"""Atomic file writes: the one helper every writer of the project uses (shards, index, rejects,
checkpoints, node-local staging).

A file (or directory) is written under a hidden temporary name beside its final name, fsynced,
and renamed onto the final name; a reader therefore sees the old contents or the new, never a
partial file, even after ``kill -9`` or a node crash. No file locking is involved (Lustre and NFS
mounts often lack flock), and the temporary name carries the writer's pid so two writers of the
same name on a shared filesystem never write into one temporary file.

    with atomic_path(out / "index.json") as tmp:
        tmp.write_text(text)

A temporary left behind by a killed writer stays hidden (``.name.tmp<pid>``) and is removed by
``remove_stale`` (called by a writer that knows it is alone, e.g. under its lock or on rank 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["AtomicFile", "atomic_path", "remove_stale", "temp_name", "write_json_atomic"]


def temp_name(path: str | Path) -> Path:
    """The hidden temporary name this process uses for ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_stale(path: str | Path) -> int:
    """Remove temporaries of ``path`` left by killed writers (any pid); returns how many."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.tmp*"))
    for p in stale:
        _remove(p)
    return len(stale)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync(p: Path) -> None:
    """fsync a file, or every file of a directory tree and the directories themselves."""
    if p.is_dir():
        for sub in p.rglob("*"):
            if sub.is_file():
                _fsync(sub)
            elif sub.is_dir():
                _fsync_dir(sub)
        _fsync_dir(p)
        return
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    """Make a rename inside ``d`` durable (best effort: some filesystems refuse a directory fd)."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicFile:
    """A write in progress: write to ``tmp``, then ``commit()`` (fsync + rename onto ``path``)
    or ``discard()``. For writers that stream over a long time (``ShardWriter``); everything else
    uses ``atomic_path``. A directory written at ``tmp`` replaces ``path`` whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        _remove(self.tmp)  # this pid's own leftover from an earlier failed attempt

    def commit(self) -> None:
        try:
            _fsync(self.tmp)
            old = self.path.with_name(f".{self.path.name}.old{os.getpid()}")
            if self.tmp.is_dir() and self.path.is_dir():  # rename cannot replace a non-empty directory:
                _remove(old)
                os.replace(self.path, old)  # move the old one aside (one rename, not a slow rmtree) ...
            os.replace(self.tmp, self.path)
            _remove(old)  # ... and delete it once the new one is in place
            _fsync_dir(self.path.parent)
        finally:
            _remove(self.tmp)  # gone after a successful rename; removed after a failure

    def discard(self) -> None:
        _remove(self.tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``,
    on error removed (``path`` keeps its old contents)."""
    f = AtomicFile(path)
    try:
        yield f.tmp
    except BaseException:
        f.discard()
        raise
    f.commit()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
