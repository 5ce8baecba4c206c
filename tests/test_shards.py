"""HDF5 shard format: ShardWriter -> index.json -> FeatureSet round trip, and read_index errors."""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_asr.config import FeatureConfig
from hpc_asr.data import FeatureSet
from hpc_asr.features import CmvnStats
from hpc_asr.shards import FORMAT, VERSION, ShardWriter, open_h5, read_index, write_json_atomic

CFG = FeatureConfig(num_mel_bins=80)


def make_utts(seed: int, lengths: list[int]) -> list[tuple[str, np.ndarray, str, str, float]]:
    rng = np.random.default_rng(seed)
    return [
        (f"s{seed}-u{i}", rng.standard_normal((n, CFG.num_mel_bins)).astype(np.float32) * 4 + 10,
         f"utt {i} of shard {seed} naïve café", f"spk{i % 2}", n / 100)
        for i, n in enumerate(lengths)
    ]


def write_dir(directory: Path, shards: dict[str, list]) -> dict:
    """Shards plus an index laid out as data_prep.fbank writes it."""
    rows, cmvn = [], CmvnStats.zeros(CFG.num_mel_bins)
    for rank, (name, utts) in enumerate(shards.items()):
        w = ShardWriter(directory / name, CFG, {"rank": rank, "size": len(shards)})
        for utt in utts:
            w.add(*utt)
            cmvn.add(utt[1])
        rows.append(w.close())
    mean, std = cmvn.mean_std()
    index = {
        "format": FORMAT, "version": VERSION, "features": asdict(CFG), "shards": rows,
        "utterances": sum(r["utterances"] for r in rows), "frames": sum(r["frames"] for r in rows),
        "hours": 0.0, "ranks": len(rows), "skipped": [],
        "cmvn": {"mean": mean.tolist(), "std": std.tolist(), "frames": cmvn.count},
    }
    write_json_atomic(directory / "index.json", index)
    return index


@pytest.fixture
def prepared(tmp_path):
    shards = {
        "shard-00000.h5": make_utts(0, [37, 1, 250]),
        "shard-00001.h5": make_utts(1, [90, 12]),
        "shard-00002.h5": [],  # a rank dealt no utterances still writes a valid, empty shard
    }
    index = write_dir(tmp_path, shards)
    return tmp_path, shards, index


def test_round_trip_exact(prepared):
    directory, shards, index = prepared
    expected = [u for utts in shards.values() for u in utts]
    fs = FeatureSet(directory)
    assert len(fs) == len(expected) == index["utterances"] == 5
    assert fs.ids == [u[0] for u in expected]
    assert fs.texts == [u[2] for u in expected]
    assert fs.num_frames.tolist() == [len(u[1]) for u in expected]
    assert fs.features == CFG
    for i, (_, feats, *_rest) in enumerate(expected):
        got = fs.feats(i)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, feats)  # float32 stored as-is: bit-exact
    all_frames = np.concatenate([u[1] for u in expected]).astype(np.float64)
    np.testing.assert_allclose(fs.cmvn_mean, all_frames.mean(0), rtol=1e-5)
    # Handles are dropped on pickling (DataLoader workers) and reopened lazily.
    clone = pickle.loads(pickle.dumps(fs))
    np.testing.assert_array_equal(clone.feats(4), expected[4][1])


def test_shard_layout_and_attrs(prepared):
    directory, shards, index = prepared
    assert sorted(p.name for p in directory.iterdir()) == ["index.json", *sorted(shards)]  # no *.tmp left
    with open_h5(directory / "shard-00000.h5") as h5:
        assert h5.attrs["format"] == FORMAT and h5.attrs["version"] == VERSION
        assert json.loads(h5.attrs["features"]) == asdict(CFG)
        assert h5.attrs["rank"] == 0 and h5.attrs["size"] == 3
        assert h5["feats"].shape == (288, CFG.num_mel_bins) and h5["feats"].dtype == np.float32
        assert h5["offsets"][:].tolist() == [0, 37, 38]
        assert h5["num_frames"][:].tolist() == [37, 1, 250]
        assert [s.decode() for s in h5["speakers"][:]] == ["spk0", "spk1", "spk0"]
        np.testing.assert_allclose(h5["durations"][:], [0.37, 0.01, 2.5], rtol=1e-6)
    with open_h5(directory / "shard-00002.h5") as h5:
        assert h5["feats"].shape == (0, CFG.num_mel_bins) and len(h5["ids"]) == 0
    assert index["shards"][0] == {"file": "shard-00000.h5", "utterances": 3, "frames": 288}


def test_writer_rejects_wrong_bins(tmp_path):
    w = ShardWriter(tmp_path / "x.h5", CFG)
    with pytest.raises(ValueError, match=r"bad: feats shape \(10, 40\), expected \(T, 80\)"):
        w.add("bad", np.zeros((10, 40), np.float32), "t", "s", 0.1)
    with pytest.raises(ValueError, match="bad1d"):
        w.add("bad1d", np.zeros(80, np.float32), "t", "s", 0.1)


def test_rewrite_replaces_atomically(tmp_path):
    path = tmp_path / "shard-00000.h5"
    w = ShardWriter(path, CFG)
    w.add(*make_utts(0, [5])[0])
    w.close()
    w = ShardWriter(path, CFG)
    w.add(*make_utts(1, [7])[0])
    w.close()
    with open_h5(path) as h5:
        assert h5["num_frames"][:].tolist() == [7]
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.h5"]


def test_read_index_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'index.json'}: no feature index")):
        read_index(tmp_path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("version", VERSION + 1, f"format '{FORMAT}' v{VERSION + 1}, expected '{FORMAT}' v{VERSION}"),
    ("format", "other.thing", f"format 'other.thing' v{VERSION}, expected '{FORMAT}' v{VERSION}"),
])
def test_read_index_wrong_format_or_version(prepared, key, value, message):
    directory, _, index = prepared
    write_json_atomic(directory / "index.json", {**index, key: value})
    with pytest.raises(ValueError, match=re.escape(f"{directory / 'index.json'}: {message}")):
        read_index(directory)
    with pytest.raises(ValueError, match=r"index\.json"):
        FeatureSet(directory)


def test_read_index_missing_shard(prepared):
    directory, _, _ = prepared
    (directory / "shard-00001.h5").unlink()
    missing = re.escape(f"{directory / 'shard-00001.h5'}: shard listed in index.json is missing")
    with pytest.raises(FileNotFoundError, match=missing):
        read_index(directory)


@pytest.mark.parametrize("mode", ["r", "a", "w"])
def test_open_h5_disables_file_locking(tmp_path, monkeypatch, mode):
    # The env variable would override h5py's default; unset it so only open_h5's argument counts.
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    path = tmp_path / "lock.h5"
    with h5py.File(path, "w") as h5:
        assert h5.id.get_access_plist().get_file_locking()[0], "h5py default should lock; check is blind"
    with open_h5(path, mode) as h5:
        use_locking, _ignore_when_disabled = h5.id.get_access_plist().get_file_locking()
        assert not use_locking
