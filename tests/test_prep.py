"""The prep pipeline as users run it: `mpirun -np 2 python -m hpc_asr prep fbank` on real LibriSpeech
audio with every kind of bad file mixed in, kill -9 and resume, --force swaps, shard caps, memory
bound, one-line abort; and the LibriSpeech manifest recipe."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import mpirun_cmd, run

from data_prep import fbank as fbank_mod
from data_prep.fbank import run as fbank_run
from data_prep.recipes import librispeech
from data_prep.verify import verify
from hpc_asr.config import FeatureConfig
from hpc_asr.data import shards as shards_mod
from hpc_asr.data.features import fbank, load_audio
from hpc_asr.data.loader import FeatureSet
from hpc_asr.data.manifest import Utterance, read_manifest, write_manifest
from hpc_asr.data.shards import open_h5
from hpc_asr.dist.launch import World

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


def bad_audio(tmp: Path, good: list[Utterance]) -> tuple[list[Utterance], list[Utterance]]:
    """(rejected, converted): every kind of bad input the prep must skip, and the inputs it must
    convert instead (8 kHz, stereo 44.1 kHz), all made from a real fixture file."""
    src = Path(good[1].audio).read_bytes()
    pcm, sr = sf.read(good[1].audio, dtype="float32")
    (tmp / "corrupt.flac").write_bytes(src[: len(src) // 2] + np.random.default_rng(0).bytes(3000))
    (tmp / "truncated.flac").write_bytes(src[: len(src) // 2])  # header fine, stream cut off
    sf.write(tmp / "empty.wav", np.zeros(0, np.int16), sr)
    sf.write(tmp / "short.wav", pcm[:300], sr)  # shorter than one 25 ms window
    sf.write(tmp / "long.wav", np.tile(pcm, 30), sr)  # > features.max_duration (60 s)
    nan = pcm[:16000].copy()
    nan[100] = np.nan
    sf.write(tmp / "nan.wav", nan, sr, subtype="FLOAT")
    sf.write(tmp / "rate2k.wav", pcm[:8000], 2000)  # a broken header's rate, not resampleable
    sf.write(tmp / "eight_k.wav", soxr.resample(pcm, sr, 8000), 8000)
    sf.write(tmp / "stereo44k.wav", np.stack([soxr.resample(pcm, sr, 44100)] * 2, axis=1), 44100)
    rejected = [Utterance(f"bad-{n}", str(tmp / f), n, 3.0, "x") for n, f in [
        ("corrupt", "corrupt.flac"), ("truncated", "truncated.flac"), ("missing", "missing.flac"),
        ("empty", "empty.wav"), ("short", "short.wav"), ("long", "long.wav"), ("nan", "nan.wav"),
        ("rate2k", "rate2k.wav")]]
    converted = [Utterance("conv-8k", str(tmp / "eight_k.wav"), good[1].text, 3.3, "y"),
                 Utterance("conv-44k", str(tmp / "stereo44k.wav"), good[1].text, 3.3, "y")]
    return rejected, converted


REASONS = {"corrupt": "cannot decode", "truncated": "cannot decode", "missing": "audio file not found",
           "empty": "no samples", "short": "too short", "long": "longer than features.max_duration=60",
           "nan": "NaN or Inf samples", "rate2k": "sample rate 2000 Hz cannot be resampled"}


@pytest.fixture(scope="module")
def prepped(tmp_path_factory, librispeech_dir):
    """One real 2-rank run shared by the tests below (mpirun start-up dominates their cost)."""
    tmp = tmp_path_factory.mktemp("prep")
    good = fixture_utts(librispeech_dir)
    assert len(good) == 4
    rejected, converted = bad_audio(tmp, good)
    manifest = tmp / "train.jsonl"
    write_manifest(manifest, good + rejected + converted)
    out = tmp / "fbank"
    cmd = mpirun_cmd(2, "-m", "hpc_asr", "prep", "fbank", "--manifest", str(manifest), "--out", str(out),
                     "--unit-seconds", "4", "--max-reject-fraction", "0.6")
    proc = run(cmd, timeout=120)
    return {"manifest": manifest, "out": out, "proc": proc, "good": good, "rejected": rejected,
            "converted": converted, "cmd": cmd}


def test_mpi_run_writes_shards_index_and_rejects(prepped):
    out, proc = prepped["out"], prepped["proc"]
    assert proc.returncode == 0
    index = json.loads((out / "index.json").read_text())
    gen = index["generation"]
    assert sorted(p.name for p in out.iterdir()) == [gen, "index.json", "rejects.jsonl"]
    assert index["ranks"] == 2 and index["units"] > 2
    # Claims are dynamic: a rank that starts late may get few or none; together, each unit once.
    assert len(index["rank_stats"]) == 2 and sum(r["units"] for r in index["rank_stats"]) == index["units"]
    assert index["utterances"] == 6 and index["inputs"] == 14 and index["rejected"] == 8
    assert index["features"] == asdict(CFG)
    rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert sorted(rejects) == sorted(u.id for u in prepped["rejected"])
    for utt in prepped["rejected"]:
        reason = REASONS[utt.id.removeprefix("bad-")]
        assert rejects[utt.id]["audio"] == utt.audio and reason in rejects[utt.id]["reason"], rejects[utt.id]
        assert f"rejected {utt.id}: " in proc.stderr
    fs = FeatureSet(out)
    assert sorted(fs.ids) == sorted(u.id for u in prepped["good"] + prepped["converted"])
    texts = dict(zip(fs.ids, fs.texts))
    assert all(texts[u.id] == u.text for u in prepped["good"])
    assert index["frames"] == int(fs.num_frames.sum())
    assert verify(out) is None


def test_other_rates_and_channels_are_resampled(prepped):
    fs = FeatureSet(prepped["out"])
    ref = fs.feats(fs.ids.index(prepped["good"][1].id))
    for utt_id in ("conv-8k", "conv-44k"):
        feats = fs.feats(fs.ids.index(utt_id))
        assert abs(len(feats) - len(ref)) <= 1
        n = min(len(feats), len(ref))
        # Same speech at the configured rate: the low and mid mel bins (below 4 kHz) agree.
        corr = np.corrcoef(feats[:n, :40].ravel(), ref[:n, :40].ravel())[0, 1]
        assert corr > 0.95, (utt_id, corr)


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


def _kaldi_native_fbank(path: str, cfg: FeatureConfig) -> np.ndarray:
    """Kaldi's own FBANK (kaldi-native-fbank, C++) of a file read by libsndfile: no hpc_asr code."""
    import kaldi_native_fbank as knf

    samples, sr = sf.read(path, dtype="float32")
    assert sr == cfg.sample_rate
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sr
    opts.frame_opts.frame_length_ms, opts.frame_opts.frame_shift_ms = cfg.frame_length_ms, cfg.frame_shift_ms
    opts.frame_opts.dither, opts.frame_opts.snip_edges = 0.0, True
    opts.mel_opts.num_bins = cfg.num_mel_bins
    opts.mel_opts.low_freq, opts.mel_opts.high_freq = cfg.low_freq, cfg.high_freq
    comp = knf.OnlineFbank(opts)
    comp.accept_waveform(sr, samples * 32768.0)  # Kaldi works on 16-bit sample values
    comp.input_finished()
    return np.stack([comp.get_frame(i) for i in range(comp.num_frames_ready)])


def test_shard_features_equal_kaldi_native_fbank_on_real_audio(prepped):
    """What the 2-rank prep wrote for the real LibriSpeech fixture utterances is Kaldi's FBANK of
    that audio, computed here by kaldi-native-fbank from libsndfile's samples (independent of the
    prep's reader and of hpc_asr.data.features), to float32 agreement on the bins that carry energy."""
    assert CFG.dither == 0.0
    fs = FeatureSet(prepped["out"])
    for utt in prepped["good"]:
        ours, ref = fs.feats(fs.ids.index(utt.id)), _kaldi_native_fbank(utt.audio, CFG)
        assert ours.shape == ref.shape, utt.id
        strong = ref > ref.max(axis=1, keepdims=True) - 15.0
        assert np.abs(ours - ref)[strong].max() < 1e-3, utt.id
        assert np.abs(ours - ref).mean() < 1e-3, utt.id


def test_rerun_is_noop(prepped):
    out = prepped["out"]
    files = [out / "index.json", *out.glob("gen-*/*.h5")]
    for path in files:  # old mtimes, so a rewrite is visible even with coarse timestamps
        os.utime(path, (1_000_000_000, 1_000_000_000))
    again = run(prepped["cmd"], timeout=120)
    assert "up to date" in again.stderr
    assert all(p.stat().st_mtime == 1_000_000_000 for p in files)


def test_too_many_rejects_exit_3_naming_count(prepped):
    cmd = [sys.executable, "-m", "hpc_asr", "prep", "fbank", *prepped["cmd"][prepped["cmd"].index("-m") + 4 :]]
    cmd[cmd.index("--max-reject-fraction") + 1] = "0.01"
    proc = run(cmd, check=False)  # a no-op rerun still says the directory has too many rejects
    assert proc.returncode == 3
    assert f"error: 8 of 14 utterances rejected (57.1% > --max-reject-fraction 0.01); see {prepped['out']}" \
        in proc.stderr


def many_utts(librispeech_dir: Path, n: int) -> list[Utterance]:
    """n utterances reusing the 4 fixture files under distinct ids."""
    good = fixture_utts(librispeech_dir)
    return [Utterance(f"u{i:03d}", g.audio, g.text, g.duration, g.speaker)
            for i, g in ((i, good[i % 4]) for i in range(n))]


def ids_in(out: Path) -> list[str]:
    return FeatureSet(out).ids


def test_kill9_of_a_rank_then_rerun_redoes_only_the_rest(tmp_path, librispeech_dir, monkeypatch):
    utts = many_utts(librispeech_dir, 24)
    manifest, out = tmp_path / "m.jsonl", tmp_path / "fbank"
    write_manifest(manifest, utts)
    cmd = mpirun_cmd(2, "-m", "hpc_asr", "prep", "fbank", "--manifest", str(manifest), "--out", str(out),
                     "--unit-seconds", "1", "--shard-utts", "2")
    monkeypatch.setenv(fbank_mod.KILL_ENV, "1:3")  # rank 1 SIGKILLs itself after its 3rd unit, mid-shard
    killed = run(cmd, timeout=120, check=False)
    monkeypatch.delenv(fbank_mod.KILL_ENV)
    assert killed.returncode != 0 and not (out / "index.json").exists()
    survivors = {p: p.stat().st_mtime_ns for p in out.glob("gen-*/shard-*.h5")}
    assert survivors, "some shards should be finished before the kill"
    again = run(cmd, timeout=120)
    todo = int(again.stderr.split(" units; ")[1].split(" to do")[0])
    assert 0 < todo < 24
    assert all(p.stat().st_mtime_ns == t for p, t in survivors.items()), "finished shards were redone"
    assert verify(out) is None
    ids = ids_in(out)
    assert sorted(ids) == [u.id for u in utts], "every utterance exactly once"
    assert not list(out.glob("gen-*/claims-*")) and not (out / "pending.json").exists()


def test_slow_rank_takes_fewer_units_and_ranks_finish_together(tmp_path, librispeech_dir, monkeypatch):
    """Rank 1 is 0.3 s slower per unit: with a static split it would finish ~3 s after rank 0;
    claiming units dynamically, the ranks finish within about one slow unit of each other."""
    utts = many_utts(librispeech_dir, 24)
    manifest, out = tmp_path / "m.jsonl", tmp_path / "fbank"
    write_manifest(manifest, utts)
    monkeypatch.setenv(fbank_mod.SLOW_ENV, "1:0.3")
    run(mpirun_cmd(2, "-m", "hpc_asr", "prep", "fbank", "--manifest", str(manifest), "--out", str(out),
                   "--unit-seconds", "1"), timeout=120)
    fast, slow = json.loads((out / "index.json").read_text())["rank_stats"]
    assert fast["units"] + slow["units"] == 24 and fast["units"] > 2 * slow["units"], (fast, slow)
    assert abs(fast["wall_s"] - slow["wall_s"]) < 0.6, (fast, slow)
    assert sorted(ids_in(out)) == [u.id for u in utts]


def test_force_killed_midway_keeps_old_index_whole(tmp_path, librispeech_dir, monkeypatch):
    utts = many_utts(librispeech_dir, 6)
    manifest, out = tmp_path / "m.jsonl", tmp_path / "fbank"
    write_manifest(manifest, utts)
    cmd = [sys.executable, "-m", "hpc_asr", "prep", "fbank", "--manifest", str(manifest), "--out", str(out),
           "--unit-seconds", "1", "--shard-utts", "1"]
    run(cmd)
    before = (out / "index.json").read_text()
    monkeypatch.setenv(fbank_mod.KILL_ENV, "0:3")
    killed = run([*cmd, "--force"], check=False)
    monkeypatch.delenv(fbank_mod.KILL_ENV)
    assert killed.returncode == -9
    assert len(list(out.glob("gen-*"))) == 2, "the forced run writes a new generation beside the old"
    assert (out / "index.json").read_text() == before and verify(out) is None
    assert sorted(ids_in(out)) == [u.id for u in utts]
    run([*cmd, "--force"])
    index = json.loads((out / "index.json").read_text())
    assert index["generation"] != json.loads(before)["generation"]
    assert [p.name for p in out.glob("gen-*")] == [index["generation"]] and verify(out) is None


def test_shard_caps_hold(tmp_path, librispeech_dir):
    utts = many_utts(librispeech_dir, 16)
    manifest, out = tmp_path / "m.jsonl", tmp_path / "fbank"
    write_manifest(manifest, utts)
    cap = 0.5 * 2**20  # bytes of frames
    fbank_run(manifest, out, CFG, World(), None,
              fbank_mod.PrepOptions(max_shard_bytes=int(cap), max_shard_utts=5, unit_seconds=1))
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) >= 4
    for row in index["shards"]:
        assert row["utterances"] <= 5 and row["frames"] * CFG.num_mel_bins * 4 <= cap, row
    assert sorted(ids_in(out)) == [u.id for u in utts]


def _peak_bytes(tmp: Path, utts: list[Utterance]) -> int:
    manifest = tmp / "m.jsonl"
    write_manifest(manifest, utts)
    cfg = FeatureConfig(backend="kaldi_native")  # numpy-allocated features, seen by tracemalloc
    tracemalloc.start()
    fbank_run(manifest, tmp / "out", cfg, World(), None, fbank_mod.PrepOptions(unit_seconds=5))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(ids_in(tmp / "out")) == len(utts)
    return peak


def test_memory_does_not_grow_with_corpus(tmp_path, librispeech_dir, monkeypatch):
    """Frames stream to disk in blocks (1 MB here): 8x the corpus (one shard) must not mean more
    memory. Buffering a shard in memory, as before, adds ~330 KB per utterance (~9 MB for 28 more)."""
    monkeypatch.setattr(shards_mod, "_WRITE_BLOCK", 1 << 20)
    small = _peak_bytes(tmp_path / "s", many_utts(librispeech_dir, 4))
    large = _peak_bytes(tmp_path / "l", many_utts(librispeech_dir, 32))
    assert large < small + 2_000_000, (small, large)


def test_speed_perturbation_adds_copies(tmp_path, librispeech_dir):
    utts = fixture_utts(librispeech_dir)[:2]
    manifest, out = tmp_path / "m.jsonl", tmp_path / "fbank"
    write_manifest(manifest, utts)
    index = fbank_run(manifest, out, CFG, World(), None, fbank_mod.PrepOptions(speeds=(0.9, 1.0, 1.1)))
    fs = FeatureSet(out)
    assert index["utterances"] == 6 and sorted(fs.ids) == sorted(
        f"{p}{u.id}" for u in utts for p in ("sp0.9-", "", "sp1.1-"))
    n = {i: fs.num_frames[fs.ids.index(i)] for i in fs.ids}
    base = utts[0].id
    assert n[f"sp0.9-{base}"] == pytest.approx(n[base] / 0.9, abs=2)
    assert n[f"sp1.1-{base}"] == pytest.approx(n[base] / 1.1, abs=2)


def test_error_on_one_rank_aborts_the_job_in_one_line(tmp_path, librispeech_dir):
    """Rank 1 runs out of disk quota (a file size limit) while writing its shard: the job must end
    at once with its error, not hang in gather until the walltime."""
    utts = many_utts(librispeech_dir, 8)
    manifest, out = tmp_path / "m.jsonl", tmp_path / "fbank"
    write_manifest(manifest, utts)
    base = mpirun_cmd(1, "-m", "hpc_asr", "prep", "fbank", "--manifest", str(manifest), "--out", str(out),
                      "--unit-seconds", "1")
    args = base[base.index(sys.executable):]
    cmd = [*base, ":", "-np", "1", "prlimit", "--fsize=100000", *args]
    proc = run(cmd, timeout=90, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: (1/2) ") and "Traceback" not in proc.stderr, \
        proc.stderr
    assert not (out / "index.json").exists()


def test_cuda_fbank_matches_cpu(tmp_path, librispeech_dir):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: `--device cuda` FBANK is checked on GPU nodes")
    x = load_audio(fixture_utts(librispeech_dir)[0].audio, CFG.sample_rate)
    np.testing.assert_allclose(fbank(x, CFG, "cuda"), fbank(x, CFG), atol=2e-3)
    utts = fixture_utts(librispeech_dir)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, utts)
    run([sys.executable, "-m", "hpc_asr", "prep", "fbank", "--manifest", str(manifest), "--out", str(tmp_path / "o"),
         "--device", "cuda"])
    assert verify(tmp_path / "o") is None


def test_bad_manifest_line_exits_2(tmp_path, prepped):
    lines = prepped["manifest"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    args = ["-m", "hpc_asr", "prep", "fbank", "--manifest", str(bad), "--out", str(tmp_path / "o")]
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
    proc = run([sys.executable, "-m", "hpc_asr", "prep", "librispeech", "--root", str(librispeech_dir.parent),
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
    assert index["utterances"] == 4 and index["rejected"] == 0 and len(index["shards"]) == 1
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
    proc = run([sys.executable, "-m", "hpc_asr", "prep", "fbank", "--manifest", str(tmp_path / "nope.jsonl"),
                "--out", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: manifest not found"


def test_rerun_rebuilds_after_a_changed_manifest_feature_config_or_speed_list(tmp_path, librispeech_dir):
    """The index fingerprint covers the manifest, the feature settings and the speed list: the same
    inputs are a no-op that rewrites nothing, each change rebuilds what the new inputs say."""
    utts = fixture_utts(librispeech_dir)[:2]
    manifest, out = tmp_path / "m.jsonl", tmp_path / "fbank"
    write_manifest(manifest, utts[:1])
    first = fbank_run(manifest, out, CFG, World(), None)
    assert first["utterances"] == 1
    files = [out / "index.json", *out.glob("gen-*/*.h5")]
    for path in files:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert fbank_run(manifest, out, CFG, World(), None)["fingerprint"] == first["fingerprint"]
    assert all(p.stat().st_mtime == 1_000_000_000 for p in files)  # up to date: nothing rewritten

    write_manifest(manifest, utts)  # one more utterance
    assert fbank_run(manifest, out, CFG, World(), None)["utterances"] == 2
    assert sorted(FeatureSet(out).ids) == sorted(u.id for u in utts)

    fewer_bins = FeatureConfig(num_mel_bins=40)
    fs = (fbank_run(manifest, out, fewer_bins, World(), None), FeatureSet(out))[1]
    assert fs.features == fewer_bins and fs.feats(0).shape[1] == 40

    index = fbank_run(manifest, out, fewer_bins, World(), None, fbank_mod.PrepOptions(speeds=(0.9, 1.0)))
    assert index["utterances"] == 4 and sum(i.startswith("sp0.9-") for i in FeatureSet(out).ids) == 2
    assert index["fingerprint"] != first["fingerprint"] and len(list(out.glob("gen-*"))) == 1  # old ones removed


def test_dither_adds_noise_in_int16_units():
    """dither > 0 (Kaldi's default is 1.0): fresh noise in every frame. Digital silence, at the log
    floor without it, reads as noise of about one int16 step with it; speech barely moves."""
    from hpc_asr.data.features import _FLOAT_EPS

    silence = np.zeros(16000, np.float32)
    assert np.allclose(fbank(silence, CFG), np.log(_FLOAT_EPS))
    noisy = fbank(silence, FeatureConfig(dither=1.0))
    assert np.isfinite(noisy).all() and noisy.mean() > np.log(_FLOAT_EPS) + 10
    again = fbank(silence, FeatureConfig(dither=1.0))
    assert not np.array_equal(noisy, again)  # drawn afresh, not a fixed pattern
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    plain, dithered = fbank(tone, CFG), fbank(tone, FeatureConfig(dither=1.0))
    loud = plain > plain.max() - 5  # bins near the tone: 0.3 full scale is ~10^4 int16 steps
    assert np.abs(plain - dithered)[loud].max() < 1e-2


def test_librispeech_skips_truncated_flac(tmp_path, librispeech_dir, capsys):
    """A download cut off inside the FLAC header is skipped with one line; one cut off later has a
    readable header, so it reaches the manifest and data_prep.fbank rejects it."""
    subset = tmp_path / "LibriSpeech" / SUBSET
    shutil.copytree(librispeech_dir / SUBSET, subset)
    for path in [subset, *subset.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    head_cut = subset / "1089" / "134686" / "1089-134686-0000.flac"
    head_cut.write_bytes(head_cut.read_bytes()[:2000])
    tail_cut = subset / "1089" / "134691" / "1089-134691-0001.flac"
    tail_cut.write_bytes(tail_cut.read_bytes()[:40000])
    manifest = tmp_path / "m.jsonl"
    assert librispeech.main(["--root", str(tmp_path), "--out", str(manifest)]) == 0
    err = capsys.readouterr().err
    assert f"skipped 1089-134686-0000: {head_cut} unreadable" in err and "Traceback" not in err
    assert [u.id for u in read_manifest(manifest)] == ["1089-134686-0001", "1089-134691-0000", "1089-134691-0001"]
    index = fbank_run(manifest, tmp_path / "fbank", CFG, World(), None,
                      fbank_mod.PrepOptions(max_reject_fraction=0.5))
    assert index["utterances"] == 2 and index["rejected"] == 1
    reject = json.loads((tmp_path / "fbank" / "rejects.jsonl").read_text())
    assert reject["id"] == "1089-134691-0001" and "cannot decode" in reject["reason"]


def test_out_holding_another_manifest_is_refused_unless_force(tmp_path, librispeech_dir):
    """--out of a directory prepared from another manifest: one line naming both, nothing touched;
    the same manifest still resumes (or rebuilds when it changed); --force replaces."""
    utts = many_utts(librispeech_dir, 3)
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "fbank"
    write_manifest(a, utts[:1])
    write_manifest(b, utts[1:2])
    cmd = [sys.executable, "-m", "hpc_asr", "prep", "fbank", "--out", str(out), "--manifest"]
    run([*cmd, str(a)])
    before = (out / "index.json").read_text()
    refused = run([*cmd, str(b)], check=False)
    assert refused.returncode == 2
    assert refused.stderr == (f"error: {out} holds the features of {a.resolve()} (index.json): use another --out, "
                              "or --force to replace them\n")
    assert (out / "index.json").read_text() == before and len(list(out.glob("gen-*"))) == 1
    assert not (out / "pending.json").exists()
    write_manifest(a, utts[:1] + utts[2:])  # the same manifest, grown: rebuilt without --force
    run([*cmd, str(a)])
    assert ids_in(out) == [utts[0].id, utts[2].id]
    run([*cmd, str(b), "--force"])
    assert ids_in(out) == [utts[1].id] and json.loads((out / "index.json").read_text())["manifest"] == str(b.resolve())
