"""Node-local staging (hpc_asr.ops.stage): one copier per node under mpirun, checksums, re-copies."""

from __future__ import annotations

import subprocess
import sys

import helpers
import pytest
from conftest import ROOT

tiny_features = helpers.tiny_features


def test_stage_once_per_node_under_mpirun(tiny_features, tmp_path):
    from conftest import mpirun_cmd, run

    dest = tmp_path / "local"
    proc = run(mpirun_cmd(2, "-m", "hpc_asr", "stage", "--dest", str(dest), str(tiny_features["train"]),
                          str(tiny_features["dev"])), timeout=120)
    assert proc.stderr.count("sha256 verified") == 2 and proc.stderr.count("up to date") == 2  # one copier
    for split in ("train", "dev"):
        src = {p.relative_to(tiny_features[split]): p.read_bytes() for p in tiny_features[split].rglob("*")
               if p.is_file()}
        got = {p.relative_to(dest / split): p.read_bytes() for p in (dest / split).rglob("*")
               if p.is_file() and p.name != ".staged.json"}
        assert got == src
    from hpc_asr.data.loader import FeatureSet

    assert len(FeatureSet(dest / "train")) == len(FeatureSet(tiny_features["train"]))


def test_stage_recopies_changed_source_and_rejects_bad_copy(tmp_path, monkeypatch):
    import shutil as sh

    from helpers import make_feature_dir

    from hpc_asr.ops import stage as st

    src = make_feature_dir(tmp_path / "shared" / "train", 4, seed=2, shards=2)
    rows = st.stage([src], tmp_path / "local")
    n_files = sum(1 for p in src.rglob("*") if p.is_file())
    assert rows[0]["copied"] == n_files >= 3 and not rows[0]["reused"]
    assert st.stage([src], tmp_path / "local")[0]["reused"]
    make_feature_dir(src, 6, seed=3, shards=2)  # the shared copy was re-prepared
    assert not st.stage([src], tmp_path / "local")[0]["reused"]

    real_copy = sh.copyfile

    def short_copy(a, b):  # a copy cut short (full node-local disk, flaky mount)
        real_copy(a, b)
        with open(b, "r+b") as f:
            f.truncate(10)

    monkeypatch.setattr(st.shutil, "copyfile", short_copy)
    with pytest.raises(st.StageError, match="copy differs from"):
        st.stage([src], tmp_path / "other")
    assert not (tmp_path / "other" / "train").exists()  # nothing half-copied is published
    missing = subprocess.run([sys.executable, "-m", "hpc_asr", "stage", "--dest", str(tmp_path / "x"),
                              str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: staging: {tmp_path / 'nope'}: source directory not found"
