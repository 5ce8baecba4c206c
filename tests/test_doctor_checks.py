"""The doctor's checks one by one, where this machine cannot show the condition: the filesystem
probe (``_fs_type``) and Lustre's ``lfs`` substituted, free disk space reported low, a wrong
allreduce sum; plus the index, sync and network-filesystem branches."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
from pathlib import Path

from conftest import run
from helpers import make_feature_dir

from hpc_asr.dist.engines import Engine
from hpc_asr.dist.launch import World
from hpc_asr.ops import doctor
from hpc_asr.ops.doctor import Check


def test_fs_type_reads_the_longest_mount_prefix():
    assert doctor._fs_type(Path("/proc/self/status")) == "proc"
    mounts = [r.split() for r in Path("/proc/mounts").read_text().splitlines()]
    root = [m[2] for m in mounts if m[1] == "/"][-1]
    assert doctor._fs_type(Path("/")) == root


def _fake_lfs(bin_dir: Path, count: str) -> Path:
    """A stand-in for Lustre's `lfs` (not installed here): prints a stripe count, logs its argv."""
    bin_dir.mkdir(exist_ok=True)
    lfs = bin_dir / "lfs"
    lfs.write_text(f'#!/bin/sh\necho "$@" >> "{bin_dir}/argv"\necho {count}\n')
    lfs.chmod(0o755)
    return bin_dir / "argv"


def test_lustre_needs_hdf5_locking_off_and_reads_the_stripe_count(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "_fs_type", lambda path: "lustre")
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    argv = _fake_lfs(tmp_path / "bin", "1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    checks = {c.name: c for c in doctor.fs_checks(tmp_path)}
    lock, stripe = checks["hdf5 locking"], checks["lustre striping"]
    assert lock.status == "fail" and "HDF5_USE_FILE_LOCKING=(unset) on Lustre" in lock.detail
    assert "export HDF5_USE_FILE_LOCKING=FALSE" in lock.fix
    assert stripe.status == "warn" and stripe.detail == f"stripe count 1 on {tmp_path}"
    assert stripe.fix == f"lfs setstripe -c 4 {tmp_path} before writing large shards"
    assert argv.read_text().split() == ["getstripe", "-c", "-d", str(tmp_path)]

    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")
    _fake_lfs(tmp_path / "bin", "4")
    assert [(c.name, c.status) for c in doctor.fs_checks(tmp_path)] == [
        ("hdf5 locking", "pass"), ("lustre striping", "pass")]

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `lfs` at all
    stripe = {c.name: c for c in doctor.fs_checks(tmp_path)}["lustre striping"]
    assert stripe.status == "warn" and "`lfs` is not on PATH" in stripe.detail


def test_data_on_a_network_filesystem_warns_to_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "_fs_type", lambda path: "nfs4")
    io = {c.name: c for c in doctor.troubleshooting_checks(World(), tmp_path, 0)}["i/o bottleneck"]
    assert io.status == "warn" and "training data on nfs4" in io.detail and "--stage" in io.fix
    monkeypatch.setattr(doctor, "_fs_type", lambda path: "xfs")
    io = {c.name: c for c in doctor.troubleshooting_checks(World(), tmp_path, 0)}["i/o bottleneck"]
    assert io.status == "pass"


def test_slow_gradient_sync_warns_only_for_gpus_across_nodes():
    slow = doctor.sync_check(1.5, gpus=8, nodes=2)
    assert slow.status == "warn" and "1.50 GB/s across 2 nodes" in slow.detail and "NCCL_IB_DISABLE" in slow.fix
    assert doctor.sync_check(25.0, gpus=8, nodes=2).status == "pass"
    assert doctor.sync_check(1.5, gpus=8, nodes=1).status == "pass"  # one node: NVLink/PCIe, not the network
    assert doctor.sync_check(0.1, gpus=0, nodes=4).status == "pass"  # CPU jobs are not held to IB bandwidth


def test_missing_empty_and_unreadable_index_fail(tmp_path):
    def data(d: Path) -> Check:
        (check,) = doctor.data_checks(d)
        return check

    d = make_feature_dir(tmp_path / "ok", 2, shards=1)
    assert data(d).status == "pass" and "2 utterances" in data(d).detail
    (d / "index.json").unlink()
    assert data(d).status == "fail" and "no index.json" in data(d).detail

    d = make_feature_dir(tmp_path / "none", 2, shards=1)
    index = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**index, "shards": [], "utterances": 0}))
    assert data(d).status == "fail" and "the index lists no utterances" in data(d).fix

    (d / "index.json").write_text("")
    assert data(d).status == "fail" and "cannot read" in data(d).detail and "not JSON" in data(d).detail

    d = make_feature_dir(tmp_path / "cut", 2, shards=1)
    shard = d / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[:100])
    assert data(d).status == "fail" and "shard-00000.h5" in data(d).detail and "--force" in data(d).fix
    assert data(None).status == "warn"


def test_low_disk_space_warns_with_the_sizes(tmp_path, monkeypatch):
    d = make_feature_dir(tmp_path / "f", 2, shards=1)
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=int(3e9)))  # a nearly full disk
    shared, local = doctor.disk_checks(d, tmp_path)
    assert shared.status == "warn" and shared.detail == f"3.0 GB free on {d}"
    assert local.status == "warn" and local.detail == f"3.0 GB free on {tmp_path} (data {size / 1e9:.2f} GB)"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=int(20e9)))
    assert [c.status for c in doctor.disk_checks(d, tmp_path)] == ["pass", "pass"]


WRONG_SUM = """
import horovod.torch as hvd
from hpc_asr.ops import doctor
real = hvd.allreduce
hvd.allreduce = lambda x, op=None, name=None: real(x, op=op, name=name) + (1 if op == hvd.Sum else 0)
hvd.init()
check, _ = doctor.allreduce_check(mb=0.01, iters=1)
hvd.shutdown()
print(check.status, check.detail)
"""


class _OffByOne(Engine):
    """A one-process engine whose sum is wrong, as a rank with a mismatched build would make it."""

    def allreduce_sum(self, t):
        return super().allreduce_sum(t) + 1


def test_a_wrong_allreduce_sum_fails():
    if "engine" in inspect.signature(doctor.allreduce_check).parameters:  # the check runs through an engine
        check, _ = doctor.allreduce_check(_OffByOne(World()), mb=0.01, iters=1)
        status, detail = check.status, check.detail
    else:  # the check talks to Horovod itself: its allreduce is the one made wrong (in a child process)
        proc = run([sys.executable, "-c", WRONG_SUM], timeout=120)
        status, detail = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert status == "fail" and "sum WRONG (2.0 != 1.0)" in detail, detail
