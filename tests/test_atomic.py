"""The one atomic-write helper: a crash or an error mid-write never leaves a partial file at the
final name; the temporary is fsynced before the rename; checkpoints go through it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_asr import atomic, checkpoint
from hpc_asr.atomic import AtomicFile, atomic_path, remove_stale, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]

_KILLED_WRITER = """
import os, signal, sys
from hpc_asr.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"new" * 100000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write, before the rename
"""


@pytest.mark.parametrize("existing", [True, False])
def test_kill9_mid_write_leaves_no_partial_file(tmp_path, existing):
    target = tmp_path / "data.bin"
    if existing:
        target.write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert proc.returncode == -9
    assert target.read_bytes() == b"old" if existing else not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".data.bin.tmp")  # hidden, never the final name
    assert remove_stale(target) == 1
    assert [p.name for p in tmp_path.iterdir()] == (["data.bin"] if existing else [])


def test_error_mid_write_keeps_old_contents_and_no_temp(tmp_path):
    target = tmp_path / "index.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("disk full")
    assert target.read_text() == '{\n "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_fsync_before_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append(("replace", Path(b).name)),
                                                            real_replace(a, b))[1])
    write_json_atomic(tmp_path / "x.json", [1])
    assert calls[:2] == ["fsync", ("replace", "x.json")]  # data on disk before the name points at it
    assert (tmp_path / "x.json").read_text() == "[\n 1\n]\n"


def test_directory_replaced_whole(tmp_path):
    dest = tmp_path / "train"
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "a.h5").write_bytes(b"a")
    with atomic_path(dest) as tmp:
        (tmp / "gen").mkdir(parents=True)
        (tmp / "gen" / "b.h5").write_bytes(b"b")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["gen", "gen/b.h5"]
    assert [p.name for p in tmp_path.iterdir()] == ["train"]


def test_discard_and_streaming_commit(tmp_path):
    f = AtomicFile(tmp_path / "s.h5")
    f.tmp.write_bytes(b"partial")
    assert not (tmp_path / "s.h5").exists()
    f.discard()
    assert list(tmp_path.iterdir()) == []
    f = AtomicFile(tmp_path / "s.h5")
    f.tmp.write_bytes(b"whole")
    f.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"] and (tmp_path / "s.h5").read_bytes() == b"whole"


def test_checkpoint_save_failing_midway_keeps_previous(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(2)}})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        checkpoint.save(path, {"model": {"w": torch.zeros(2)}, "bad": lambda: None})
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp left behind
    checkpoint.copy(path, tmp_path / "best.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
