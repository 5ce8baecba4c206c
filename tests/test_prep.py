"""The prep pipeline as users run it: `mpirun -np 2 python -m data_prep.fbank` on real LibriSpeech
audio with a corrupt and a missing file mixed in, and the LibriSpeech manifest recipe."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import mpirun_cmd, run

from data_prep import librispeech
from data_prep.fbank import run as fbank_run
from hpc_asr.config import FeatureConfig
from hpc_asr.data import FeatureSet
from hpc_asr.dist import World
from hpc_asr.features import fbank, load_audio
from hpc_asr.manifest import Utterance, read_manifest, write_manifest
from hpc_asr.shards import open_h5

CFG = FeatureConfig()
SUBSET = "test-clean"


def fixture_utts(librispeech_dir: Path) -> list[Utterance]:
    return librispeech.read_subset(librispeech_dir / SUBSET)


def trans_txt(librispeech_dir: Path) -> dict[str, str]:
    out = {}
    for path in (librispeech_dir / SUBSET).glob("*/*/*.trans.txt"):
        for line in path.read_text().splitlines():
            utt_id, words = line.split(" ", 1)
            out[utt_id] = words
    return out


@pytest.fixture(scope="module")
def prepped(tmp_path_factory, librispeech_dir):
    """One real 2-rank run shared by the tests below (mpirun start-up dominates their cost)."""
    tmp = tmp_path_factory.mktemp("prep")
    good = fixture_utts(librispeech_dir)
    assert len(good) == 4
    src = Path(good[1].audio).read_bytes()
    # A download cut off mid-stream and overwritten with junk: the header parses, decoding doesn't.
    (tmp / "corrupt.flac").write_bytes(src[: len(src) // 2] + np.random.default_rng(0).bytes(3000))
    broken = [
        Utterance("bad-corrupt", str(tmp / "corrupt.flac"), "corrupt audio", 3.0, "x"),
        Utterance("bad-missing", str(tmp / "missing.flac"), "missing audio", 1.0, "x"),
    ]
    manifest = tmp / "train.jsonl"
    write_manifest(manifest, good + broken)
    out = tmp / "fbank"
    proc = run(mpirun_cmd(2, "-m", "data_prep.fbank", "--manifest", str(manifest), "--out", str(out)), timeout=120)
    return {"manifest": manifest, "out": out, "proc": proc, "good": good, "broken": broken}


def test_mpi_run_writes_shards_and_index(prepped):
    out, proc = prepped["out"], prepped["proc"]
    assert proc.returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.h5", "shard-00001.h5"]
    index = json.loads((out / "index.json").read_text())
    assert index["ranks"] == 2 and len(index["shards"]) == 2
    assert index["utterances"] == 4
    assert all(s["utterances"] > 0 for s in index["shards"]), "longest-first dealing should feed both ranks"
    assert index["features"] == asdict(CFG)
    skipped = {s["id"]: s for s in index["skipped"]}
    assert sorted(skipped) == ["bad-corrupt", "bad-missing"]
    for utt in prepped["broken"]:
        assert skipped[utt.id]["audio"] == utt.audio
        reason = "audio file not found" if utt.id == "bad-missing" else "cannot decode"
        assert utt.audio in skipped[utt.id]["error"] and reason in skipped[utt.id]["error"]
        assert f"skipped {utt.id} ({utt.audio})" in proc.stderr
    fs = FeatureSet(out)
    assert sorted(fs.ids) == sorted(u.id for u in prepped["good"])
    texts = dict(zip(fs.ids, fs.texts))
    assert all(texts[u.id] == u.text for u in prepped["good"])
    assert index["frames"] == int(fs.num_frames.sum())


def test_cmvn_matches_frames_in_shards(prepped):
    out = prepped["out"]
    index = json.loads((out / "index.json").read_text())
    frames = []
    for shard in index["shards"]:
        with open_h5(out / shard["file"]) as h5:
            frames.append(h5["feats"][:].astype(np.float64))
    frames = np.concatenate(frames)
    assert index["cmvn"]["frames"] == len(frames)
    np.testing.assert_allclose(index["cmvn"]["mean"], frames.mean(0), atol=1e-4)
    np.testing.assert_allclose(index["cmvn"]["std"], frames.std(0), atol=1e-4)


def test_shard_features_equal_library_fbank(prepped):
    fs = FeatureSet(prepped["out"])
    for utt in prepped["good"]:
        i = fs.ids.index(utt.id)
        np.testing.assert_array_equal(fs.feats(i), fbank(load_audio(utt.audio, CFG.sample_rate), CFG))


def test_rerun_is_noop_and_force_rewrites(prepped):
    out, manifest = prepped["out"], prepped["manifest"]
    shards = sorted(out.glob("shard-*.h5"))
    # Old mtimes, so a rewrite is visible even on filesystems with coarse timestamps.
    for path in [*shards, out / "index.json"]:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    cmd = mpirun_cmd(2, "-m", "data_prep.fbank", "--manifest", str(manifest), "--out", str(out))
    again = run(cmd, timeout=120)
    assert "up to date" in again.stderr
    assert all(p.stat().st_mtime == 1_000_000_000 for p in [*shards, out / "index.json"])
    forced = run([*cmd, "--force"], timeout=120)
    assert "up to date" not in forced.stderr
    assert all(p.stat().st_mtime > 1_000_000_000 for p in [*shards, out / "index.json"])
    assert len(json.loads((out / "index.json").read_text())["skipped"]) == 2


def test_bad_manifest_line_exits_2(tmp_path, prepped):
    lines = prepped["manifest"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    args = ["-m", "data_prep.fbank", "--manifest", str(bad), "--out", str(tmp_path / "o")]
    single = run([sys.executable, *args], check=False)
    assert single.returncode == 2
    assert single.stderr.strip().count("\n") == 0, single.stderr  # one line, no traceback
    assert single.stderr.startswith(f"error: {bad}:2: not JSON")
    # Under mpirun every rank hits it; MPI_Abort must end the job with the same code, not hang.
    multi = run(mpirun_cmd(2, *args), check=False, timeout=120)
    assert multi.returncode == 2 and f"{bad}:2: not JSON" in multi.stderr
    assert not (tmp_path / "o").exists()


def test_librispeech_recipe_end_to_end(tmp_path, librispeech_dir):
    manifest = tmp_path / "ls" / f"{SUBSET}.jsonl"
    proc = run([sys.executable, "-m", "data_prep.librispeech", "--root", str(librispeech_dir.parent),
                "--subset", SUBSET, "--out", str(manifest)])
    assert "4 utterances" in proc.stderr
    utts = read_manifest(manifest)
    expected = trans_txt(librispeech_dir)
    assert [u.id for u in utts] == sorted(expected)
    for u in utts:
        assert u.text == expected[u.id].lower() and u.text.islower()
        assert Path(u.audio).is_absolute() and Path(u.audio).name == f"{u.id}.flac"
        assert u.speaker == "1089"
        assert u.duration == pytest.approx(len(load_audio(u.audio, 16000)) / 16000, abs=1e-3)
    out = tmp_path / "fbank"
    index = fbank_run(manifest, out, CFG, World(), None)
    assert index["utterances"] == 4 and index["skipped"] == [] and len(index["shards"]) == 1
    fs = FeatureSet(out)
    assert dict(zip(fs.ids, fs.texts)) == {u.id: u.text for u in utts}


@pytest.mark.parametrize("root", ["parent", "LibriSpeech", "subset"])
def test_librispeech_root_forms(tmp_path, librispeech_dir, root):
    given = {"parent": librispeech_dir.parent, "LibriSpeech": librispeech_dir,
             "subset": librispeech_dir / SUBSET}[root]
    assert librispeech.main(["--root", str(given), "--subset", SUBSET, "--out", str(tmp_path / "m.jsonl")]) == 0
    assert len(read_manifest(tmp_path / "m.jsonl")) == 4


def test_librispeech_skips_bad_lines(tmp_path, librispeech_dir, capsys):
    subset = tmp_path / "LibriSpeech" / SUBSET
    shutil.copytree(librispeech_dir / SUBSET, subset)
    for path in [subset, *subset.rglob("*")]:  # the fixture is read-only and copytree keeps modes
        path.chmod(0o755 if path.is_dir() else 0o644)
    chapter = subset / "1089" / "134691"
    (chapter / "1089-134691-0001.flac").unlink()
    trans = chapter / "1089-134691.trans.txt"
    trans.write_text(trans.read_text() + "\n1089-134691-0002\n")  # an id with no words
    assert librispeech.main(["--root", str(tmp_path), "--out", str(tmp_path / "m.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "1089-134691-0001.flac not found" in err
    assert f"{trans}:3: no transcript words" in err
    assert [u.id for u in read_manifest(tmp_path / "m.jsonl")] == [
        "1089-134686-0000", "1089-134686-0001", "1089-134691-0000"]


def test_librispeech_no_transcripts_exits_2(tmp_path, capsys):
    assert librispeech.main(["--root", str(tmp_path), "--out", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "trans.txt" in err
    assert not (tmp_path / "m.jsonl").exists()


def test_missing_manifest_is_one_line_naming_it(tmp_path):
    proc = run([sys.executable, "-m", "data_prep.fbank", "--manifest", str(tmp_path / "nope.jsonl"),
                "--out", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: manifest not found"
