"""HDF5 shard format: ShardWriter -> index.json -> FeatureSet round trip, and read_index errors."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.verify import verify
from hpc_asr.config import FeatureConfig
from hpc_asr.data.features import CmvnStats
from hpc_asr.data.loader import FeatureSet
from hpc_asr.data.shards import (
    FORMAT,
    VERSION,
    ShardError,
    ShardWriter,
    check_shard,
    open_h5,
    read_index,
    write_index,
    write_json_atomic,
)

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
    return write_index(directory, CFG, rows, (cmvn.sum, cmvn.sumsq, cmvn.count), ranks=len(rows))


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
    row = index["shards"][0]
    assert {k: row[k] for k in ("file", "utterances", "frames")} == {"file": "shard-00000.h5", "utterances": 3,
                                                                    "frames": 288}
    assert row["bytes"] == (directory / "shard-00000.h5").stat().st_size and row["checksum"].startswith("crc32:")


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


def test_writer_streams_and_reports_full(tmp_path):
    """Frames go to disk in blocks of at most 8 MB through one reused buffer (memory never holds a
    shard); an utterance longer than the buffer is written as it is; `full` at the byte cap."""
    w = ShardWriter(tmp_path / "s.h5", CFG, max_bytes=100_000 * CFG.num_mel_bins * 4)
    big = make_utts(0, [10_000] * 4)  # 3.2 MB each
    for utt in big[:3]:
        w.add(*utt)
    assert not (tmp_path / "s.h5").exists() and w._pending_frames == 10_000  # the third did not fit
    assert w._buf.nbytes <= 8 << 20
    with open_h5(next(tmp_path.glob(".s.h5.tmp*"))) as h5:  # a temp name until close
        assert h5["feats"].shape == (20_000, CFG.num_mel_bins)
        np.testing.assert_array_equal(h5["feats"][10_000:], big[1][1])
    w.add(*big[3])
    assert w._pending_frames == 20_000 and w.frames == 40_000 and not w.full
    huge = make_utts(1, [60_000])[0]  # 19 MB: longer than the buffer
    w.add(*huge)
    assert w.full and w._pending_frames == 0
    assert ShardWriter(tmp_path / "u.h5", CFG, max_utts=1).full is False
    row = w.close()
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"] and row["utterances"] == 5
    with open_h5(tmp_path / "s.h5") as h5:
        np.testing.assert_array_equal(h5["feats"][20_000:30_000], big[2][1])
        np.testing.assert_array_equal(h5["feats"][30_000:40_000], big[3][1])
        np.testing.assert_array_equal(h5["feats"][40_000:], huge[1])


def test_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", CFG)
    w.add(*make_utts(0, [5])[0])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_verify_passes_then_names_truncated_shard(prepared):
    directory, _, index = prepared
    assert verify(directory) is None
    path = directory / "shard-00000.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert verify(directory).startswith(f"{path}: {len(data) // 2} bytes, index says {len(data)}")
    # Without the byte count, opening the truncated file itself fails, in one line naming it.
    assert check_shard(directory, {**index["shards"][0], "bytes": len(data) // 2}, index["features"]).startswith(
        f"{path}: unreadable shard")


def test_verify_catches_flipped_frame_and_nan(prepared):
    directory, _, index = prepared
    with open_h5(directory / "shard-00001.h5", "a") as h5:
        h5["feats"][3, 7] += 1.0
    assert "checksum" in verify(directory) and "shard-00001.h5" in verify(directory)
    with open_h5(directory / "shard-00001.h5", "a") as h5:
        h5["feats"][3, 7] = np.nan
    assert check_shard(directory, {k: v for k, v in index["shards"][1].items() if k != "checksum"},
                       index["features"]).endswith("NaN or Inf")


def test_verify_catches_attr_and_count_mismatch(prepared):
    directory, _, index = prepared
    with open_h5(directory / "shard-00001.h5", "a") as h5:
        h5.attrs["features"] = json.dumps({**asdict(CFG), "num_mel_bins": 40})
    rows = [{k: v for k, v in r.items() if k != "bytes"} for r in index["shards"]]
    write_json_atomic(directory / "index.json", {**index, "shards": rows})
    assert verify(directory) == f"{directory / 'shard-00001.h5'}: feature settings differ from index.json"
    rows[0]["utterances"] = 4
    write_json_atomic(directory / "index.json", {**index, "shards": rows})
    assert verify(directory) == f"{directory / 'shard-00000.h5'}: 3 utterances, index says 4"


def test_verify_cli_exit_codes(prepared, capsys):
    from data_prep.verify import main

    directory, _, _ = prepared
    assert main([str(directory)]) == 0
    (directory / "shard-00002.h5").write_bytes(b"garbage")
    assert main([str(directory)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {directory / 'shard-00002.h5'}")


def test_featureset_on_truncated_shard_is_one_line(prepared):
    directory, _, _ = prepared
    path = directory / "shard-00000.h5"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ShardError) as e:
        FeatureSet(directory)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: unreadable shard")
    assert msg.endswith(f"run `python -m hpc_asr prep verify {directory}`")
    assert isinstance(e.value, ValueError)  # train/evaluate print ValueError as `error: ...`


def test_featureset_read_error_after_open_is_one_line(prepared):
    directory, _, _ = prepared
    fs = FeatureSet(directory)
    path = directory / "shard-00000.h5"
    path.write_bytes(path.read_bytes()[:-200_000])  # frames cut off after the metadata was read
    with pytest.raises(ShardError, match=re.escape(f"{path}: unreadable shard")):
        for i in range(len(fs)):
            fs.feats(i)


def test_truncated_shard_hint_is_a_verify_command_that_works(tmp_path):
    """data_prep.fbank keeps shards in a generation subdirectory (DIR/gen-*/shard-*.h5): the
    message of a truncated shard must suggest verifying DIR (where index.json is), and running
    that very command names the truncated shard instead of failing on a missing index."""
    gen = tmp_path / "gen-20260101T000000-abcdef"
    gen.mkdir()
    rows, cmvn = [], CmvnStats.zeros(CFG.num_mel_bins)
    for seed in (0, 1):
        w = ShardWriter(gen / f"shard-{seed:06d}.h5", CFG, {"rank": seed, "size": 2})
        for utt in make_utts(seed, [40, 60]):
            w.add(*utt)
            cmvn.add(utt[1])
        rows.append({**w.close(), "file": f"{gen.name}/shard-{seed:06d}.h5"})
    write_index(tmp_path, CFG, rows, (cmvn.sum, cmvn.sumsq, cmvn.count), ranks=2, generation=gen.name)
    path = gen / "shard-000000.h5"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ShardError) as e:
        FeatureSet(tmp_path)
    hint = re.search(r"run `(python -m hpc_asr prep verify [^`]+)`$", str(e.value))
    assert hint, str(e.value)
    proc = subprocess.run([sys.executable, *shlex.split(hint.group(1))[1:]], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {path}: 3000 bytes"), proc.stderr
