"""hpc_asr.bench.peer: PocketSphinx scored like our model, on the real LibriSpeech fixture, on 1 and
2 MPI ranks; a bad manifest is one line."""

from __future__ import annotations

import json
import sys

import pocketsphinx  # noqa: F401  (pinned: a missing peer is a failure, not a skip)
import pytest
from conftest import mpirun_cmd, run

from hpc_asr.data.manifest import Utterance, write_manifest


@pytest.fixture(scope="module")
def fixture_manifest(tmp_path_factory, librispeech_dir):
    out = tmp_path_factory.mktemp("peer") / "real.jsonl"
    run([sys.executable, "-m", "hpc_asr", "prep", "librispeech", "--root", str(librispeech_dir.parent),
         "--subset", "test-clean", "--out", str(out)])
    return out


def test_peer_scores_the_real_fixture(fixture_manifest, tmp_path):
    out = tmp_path / "peer.json"
    run([sys.executable, "-m", "hpc_asr", "bench", "peer", "--manifest", str(fixture_manifest), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["utterances"] == 4 and res["words"] == 58
    assert 0.15 < res["wer"] < 0.45  # measured 31 %: a real recognizer, not a stub, not perfect
    assert 0 < res["rtf"] < 2 and res["threads"] == 1
    assert any(h["hyp"] == h["ref"] == "he could wait no longer" for h in res["hypotheses"])


def test_two_ranks_give_the_same_result(fixture_manifest, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([sys.executable, "-m", "hpc_asr", "bench", "peer", "--manifest", str(fixture_manifest), "--out", str(one)])
    run(mpirun_cmd(2, "-m", "hpc_asr", "bench", "peer", "--manifest", str(fixture_manifest), "--out", str(two)))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["hypotheses"] == b["hypotheses"] and a["wer"] == b["wer"]


def test_rerun_is_skipped_when_up_to_date(fixture_manifest, tmp_path):
    out = tmp_path / "peer.json"
    run([sys.executable, "-m", "hpc_asr", "bench", "peer", "--manifest", str(fixture_manifest), "--out", str(out),
         "--limit", "1"])
    again = run([sys.executable, "-m", "hpc_asr", "bench", "peer", "--manifest", str(fixture_manifest), "--out",
                 str(out),
                 "--limit", "1"])
    assert "up to date" in again.stdout and json.loads(out.read_text())["utterances"] == 1


def test_bad_manifest_and_unreadable_audio(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    proc = run([sys.executable, "-m", "hpc_asr", "bench", "peer", "--manifest", str(bad), "--out",
                str(tmp_path / "o.json")],
               check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "bad.jsonl:1" in proc.stderr
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEfmt nonsense")
    m = tmp_path / "m.jsonl"
    write_manifest(m, [Utterance("x", str(tmp_path / "broken.wav"), "hello")])
    proc = run([sys.executable, "-m", "hpc_asr", "bench", "peer", "--manifest", str(m), "--out",
                str(tmp_path / "o.json")])
    assert "skipped" in proc.stderr and "broken.wav" in proc.stderr
    assert json.loads((tmp_path / "o.json").read_text())["utterances"] == 0


def test_bench_times_both_recognizers_on_the_same_waveforms(librispeech_dir):
    from hpc_asr.bench.micro import bench_vs_pocketsphinx
    from hpc_asr.config import ModelConfig

    res = bench_vs_pocketsphinx(ModelConfig(d_model=32, n_heads=2, n_layers=1), librispeech_dir.parent)
    assert res["utterances"] == 4 and 20 < res["audio_s"] < 25
    assert res["ours_rtf"] > 0 and res["pocketsphinx_rtf"] > 0
    assert res["speedup_vs_pocketsphinx"] == pytest.approx(res["pocketsphinx_rtf"] / res["ours_rtf"], rel=0.05)
