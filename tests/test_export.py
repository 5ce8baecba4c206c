"""Export: the CLI proves parity before files are final, the ONNX graph keeps dynamic batch and
time axes, and the deployable Recognizer decodes raw audio. Plus checkpoint loading errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from conftest import run

from hpc_asr import checkpoint
from hpc_asr.bench.latency import measure
from hpc_asr.cli import load_config
from hpc_asr.config import Config
from hpc_asr.data.loader import FeatureSet
from hpc_asr.data.tokenizer import CharTokenizer
from hpc_asr.decode.ngram import build_arpa
from hpc_asr.deploy import export
from hpc_asr.deploy.recognizer import Recognizer
from hpc_asr.model import ConformerCTC

tiny_features = helpers.tiny_features  # the shared session fixture, by module attribute


def save_random_checkpoint(path: Path, data_dir: Path, *overrides: str) -> Config:
    """What train.py stores, minus the optimizer: enough for checkpoint.load_model."""
    cfg = load_config(None, ["--model.d_model", "32", "--model.n_heads", "2", "--model.n_layers", "1",
                             "--model.ff_mult", "2", "--model.conv_kernel", "5",
                             "--model.subsample_channels", "8", *overrides])
    tok = CharTokenizer()
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    data = FeatureSet(data_dir)
    model.set_cmvn(data.cmvn_mean, data.cmvn_std)
    checkpoint.save(path, {"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": tok.state_dict()})
    return cfg


@pytest.fixture(scope="module", params=["conv2d", "conv1d"])
def exported(request, tiny_features, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    ckpt = root / "tiny.pt"
    save_random_checkpoint(ckpt, tiny_features["train"], "--model.subsampling", request.param)
    build_arpa(["turn the lights on", "set a timer"], 2, root / "lm" / "lm.arpa")  # the LM beside the model
    (root / "lm" / "decode.json").write_text('{"lm_weight": 0.5, "word_score": 1.0}')
    out = root / "export"
    proc = run([sys.executable, "-m", "hpc_asr", "export",
                "--checkpoint", str(ckpt), "--data", str(tiny_features["dev"]), "--out-dir", str(out)],
               timeout=240)
    return {"ckpt": ckpt, "out": out, "proc": proc, "data": tiny_features["dev"]}


def test_export_cli_writes_files_after_parity(exported):
    out = exported["out"]
    assert exported["proc"].returncode == 0
    res = json.loads((out / "export.json").read_text())
    assert res["parity_ok"] is True and res["utterances"] == 4
    assert res["onnx_max_abs_diff"] < 1e-3 and res["torchscript_max_abs_diff"] < 1e-3
    assert res["onnx_transcripts_match"] and res["torchscript_transcripts_match"]
    assert (out / "model.onnx").stat().st_size > 0 and (out / "model.ts").stat().st_size > 0
    for name in ("lm.arpa", "decode.json"):  # the deployable unit carries the LM and its tuned weights
        assert (out / "lm" / name).read_bytes() == (exported["ckpt"].parent / "lm" / name).read_bytes()
    assert not list(out.glob("*.tmp*"))
    meta = json.loads((out / "model.json").read_text())
    assert meta["tokenizer"] == CharTokenizer().state_dict() and meta["blank"] == 0
    assert meta["features"]["num_mel_bins"] == 80


def _pytorch_reference(exported, feats: np.ndarray, lens: np.ndarray):
    model, _, _ = checkpoint.load_model(exported["ckpt"])
    with torch.no_grad():
        lp, out_lens = model(torch.from_numpy(feats), torch.from_numpy(lens))
    return lp.numpy(), out_lens.numpy()


def _odd_batch() -> tuple[np.ndarray, np.ndarray]:
    """Batch size and lengths unlike the (2, 240) example the exporter traced with."""
    rng = np.random.default_rng(0)
    lens = np.array([97, 301, 13], np.int64)
    feats = np.zeros((3, 301, 80), np.float32)
    for i, n in enumerate(lens):
        feats[i, :n] = 3 + 2 * rng.standard_normal((n, 80))
    return feats, lens


def test_onnx_dynamic_axes_match_pytorch(exported):
    import onnxruntime as ort

    feats, lens = _odd_batch()
    sess = ort.InferenceSession(str(exported["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    lp, out_lens = sess.run(["log_probs", "out_lens"], {"feats": feats, "feat_lens": lens})
    ref_lp, ref_lens = _pytorch_reference(exported, feats, lens)
    assert lp.shape == ref_lp.shape and out_lens.tolist() == ref_lens.tolist() == [23, 74, 2]
    for b, n in enumerate(ref_lens):
        np.testing.assert_allclose(lp[b, :n], ref_lp[b, :n], atol=1e-4, rtol=0)
    one, one_len = sess.run(None, {"feats": feats[:1, :97], "feat_lens": lens[:1]})  # batch of one
    np.testing.assert_allclose(one[0, : one_len[0]], ref_lp[0, : ref_lens[0]], atol=1e-4, rtol=0)


def test_torchscript_dynamic_axes_match_pytorch(exported):
    feats, lens = _odd_batch()
    ts = torch.jit.load(str(exported["out"] / "model.ts"))
    with torch.no_grad():
        lp, out_lens = ts(torch.from_numpy(feats), torch.from_numpy(lens))
    ref_lp, ref_lens = _pytorch_reference(exported, feats, lens)
    assert out_lens.tolist() == ref_lens.tolist()
    for b, n in enumerate(ref_lens):
        np.testing.assert_allclose(lp[b, :n].numpy(), ref_lp[b, :n], atol=1e-5, rtol=0)


def test_recognizer_and_latency(exported):
    rec = Recognizer(exported["out"], threads=1)
    sr = rec.features.sample_rate
    rng = np.random.default_rng(1)
    waves = []
    for seconds, hz in ((1.0, 220.0), (1.5, 440.0), (0.6, 330.0)):
        t = np.arange(int(seconds * sr)) / sr
        waves.append((0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
    text = rec(waves[0])
    assert isinstance(text, str) and set(text) <= set(rec.tokenizer.symbols)
    assert rec.features_of(waves[0]).shape == (98, 80)  # 1 + (16000 - 400) // 160 frames

    res = measure(rec, waves, warmup=1)
    assert res["utterances"] == 3 and res["audio_s"] == pytest.approx(3.1, abs=0.01)
    assert 0 < res["latency_ms_p50"] <= res["latency_ms_p95"] <= res["latency_ms_max"]
    assert res["rtf"] > 0 and res["rtf_fbank"] > 0 and res["rtf_model"] > 0
    assert res["rtf_fbank"] + res["rtf_model"] == pytest.approx(res["rtf"], rel=0.05, abs=1e-3)


@pytest.fixture()
def keep_threads():
    """export.main sets torch threads to every core; in this process that would slow later tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_failed_parity_leaves_no_final_files(tiny_features, tmp_path, capsys, keep_threads):
    ckpt = tmp_path / "strict.pt"
    save_random_checkpoint(ckpt, tiny_features["train"], "--export.atol", "1e-30")  # never this close
    out = tmp_path / "export"
    rc = export.main(["--checkpoint", str(ckpt), "--data", str(tiny_features["dev"]), "--out-dir", str(out),
                      "--max-utts", "2"])
    assert rc == 1 and "parity failed" in capsys.readouterr().err
    assert json.loads((out / "export.json").read_text())["parity_ok"] is False
    assert not (out / "model.onnx").exists() and not (out / "model.ts").exists()
    assert sorted(p.name for p in out.iterdir()) == ["export.json"]  # no temporaries left behind either


def test_checkpoint_load_errors_name_the_path(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\x00\x01")
    with pytest.raises(checkpoint.CheckpointError, match="not an hpc_asr checkpoint") as e:
        checkpoint.load(garbage)
    assert str(garbage) in str(e.value)
    missing = tmp_path / "missing.pt"
    with pytest.raises(checkpoint.CheckpointError, match="not found") as e:
        checkpoint.load(missing)
    assert str(missing) in str(e.value)
    old = tmp_path / "old.pt"
    torch.save({"format_version": 0, "model": {}}, old)
    with pytest.raises(checkpoint.CheckpointError, match="format_version") as e:
        checkpoint.load(old)
    assert str(old) in str(e.value)


def test_export_cli_rejects_garbage_checkpoint(tiny_features, tmp_path, capsys, keep_threads):
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("nope")
    rc = export.main(["--checkpoint", str(garbage), "--data", str(tiny_features["dev"]),
                      "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and str(garbage) in err
    assert not (tmp_path / "x").exists()


def test_export_threads_follow_the_cpu_affinity(tiny_features, tmp_path, monkeypatch, keep_threads):
    """A job given one CPU of the node (SLURM --cpus-per-task, taskset) exports with one thread,
    not one per core of the node."""
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with at least 2 CPUs to restrict")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ckpt = tmp_path / "m.pt"
    save_random_checkpoint(ckpt, tiny_features["train"])
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        rc = export.main(["--checkpoint", str(ckpt), "--data", str(tiny_features["dev"]), "--out-dir",
                          str(tmp_path / "export"), "--max-utts", "1"])
        threads = torch.get_num_threads()
    finally:
        os.sched_setaffinity(0, before)
    assert rc == 0 and threads == 1


def test_export_directory_is_complete_or_untouched_after_a_crash(tiny_features, tmp_path, monkeypatch, keep_threads):
    """A crash while the metadata is written (after ONNX and TorchScript passed parity) leaves no
    model without its model.json: a new export directory does not appear, and an earlier complete
    export stays as it was, every file of it."""
    ckpt = tmp_path / "m.pt"
    save_random_checkpoint(ckpt, tiny_features["train"])
    args = ["--checkpoint", str(ckpt), "--data", str(tiny_features["dev"]), "--max-utts", "1"]

    def killed(self):
        raise RuntimeError("killed while writing model.json")

    fresh = tmp_path / "fresh"
    with monkeypatch.context() as m:
        m.setattr(CharTokenizer, "json_state", killed)
        with pytest.raises(RuntimeError, match="killed"):
            export.main([*args, "--out-dir", str(fresh)])
    assert not (fresh / "model.onnx").exists() and not (fresh / "model.ts").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries either

    done = tmp_path / "done"
    assert export.main([*args, "--out-dir", str(done)]) == 0
    files = {p.relative_to(done): p.read_bytes() for p in done.rglob("*") if p.is_file()}
    assert {"model.onnx", "model.ts", "model.json", "export.json"} <= {str(p) for p in files}
    with monkeypatch.context() as m:
        m.setattr(CharTokenizer, "json_state", killed)
        with pytest.raises(RuntimeError, match="killed"):
            export.main([*args, "--out-dir", str(done)])
    assert {p.relative_to(done): p.read_bytes() for p in done.rglob("*") if p.is_file()} == files
    meta = json.loads((done / "model.json").read_text())
    assert meta["checkpoint_sha256"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()


# ---- the deployable Recognizer against evaluate, on real audio, char and BPE ----------------

@pytest.fixture(scope="module", params=["char", "bpe"])
def real_export(request, tmp_path_factory, librispeech_dir) -> dict:
    """The 4 real LibriSpeech fixture utterances prepared by the prep library, a (random) model
    with a char or BPE tokenizer (all GPU presets use BPE), its export, and evaluate's greedy
    transcripts of the prepared split."""
    from data_prep.fbank import run as fbank_run
    from data_prep.recipes import librispeech
    from hpc_asr.data.manifest import write_manifest
    from hpc_asr.data.tokenizer import train_bpe
    from hpc_asr.dist.launch import World

    tmp = tmp_path_factory.mktemp(f"real_{request.param}")
    utts = librispeech.read_subset(librispeech.subset_dir(librispeech_dir, "test-clean"))
    write_manifest(tmp / "real.jsonl", utts)
    fbank_run(tmp / "real.jsonl", tmp / "fbank", Config().features, World(), None)
    tok = CharTokenizer() if request.param == "char" else train_bpe([u.text for u in utts], 60)
    cfg = load_config(None, ["--model.d_model", "32", "--model.n_heads", "2", "--model.n_layers", "1",
                             "--model.ff_mult", "2", "--model.conv_kernel", "5", "--model.subsampling", "conv1d"])
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(1)
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    data = FeatureSet(tmp / "fbank")
    model.set_cmvn(data.cmvn_mean, data.cmvn_std)
    ckpt = tmp / "model" / "last.pt"
    checkpoint.save(ckpt, {"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": tok.state_dict()})
    run([sys.executable, "-m", "hpc_asr", "export", "--checkpoint", str(ckpt), "--data", str(tmp / "fbank"),
         "--out-dir", str(tmp / "export")], timeout=300)
    run([sys.executable, "-m", "hpc_asr", "evaluate", "--checkpoint", str(ckpt), "--data", str(tmp / "fbank"),
         "--decoder", "greedy", "--out", str(tmp / "eval.json")], timeout=300)
    return {"utts": utts, "export": tmp / "export", "eval": json.loads((tmp / "eval.json").read_text()),
            "kind": request.param}


def test_recognizer_transcribes_the_audio_as_evaluate_does(real_export):
    """The exported Recognizer (waveform → FBANK → ONNX → greedy) loads the model's own tokenizer,
    BPE included, and gives, for each real utterance, the transcript evaluate gives for the same
    audio prepared by the prep library: one feature definition and one model, end to end."""
    from hpc_asr.data.features import load_audio

    rec = Recognizer(real_export["export"], threads=1)
    assert type(rec.tokenizer).__name__ == {"char": "CharTokenizer", "bpe": "BpeTokenizer"}[real_export["kind"]]
    hyps = real_export["eval"]["hypotheses"]
    assert len(hyps) == len(real_export["utts"]) == 4
    ours = {u.id: rec(load_audio(u.audio, rec.features.sample_rate)) for u in real_export["utts"]}
    assert ours == {i: h["hyp"] for i, h in hyps.items()}
    assert all(len(t) >= 5 for t in ours.values()), ours  # text to compare, not empty strings


# ---- export variants: FBANK inside the graph, int8 ------------------------------------------

def test_fbank_graph_equals_prep_features_on_real_speech(librispeech_dir, tmp_path):
    """The in-graph FBANK (run by ONNX Runtime) against prep's features.fbank on a real LibriSpeech
    utterance and on the gate's test signals: same frame count, log-mel within 2e-3."""
    import onnxruntime as ort

    from hpc_asr.config import FeatureConfig
    from hpc_asr.data.features import fbank, load_audio
    from hpc_asr.deploy.variants import FbankGraph, gate_signals

    cfg = FeatureConfig()
    path = sorted(librispeech_dir.rglob("*.flac"))[0]
    waves = [load_audio(str(path), cfg.sample_rate)[: 3 * cfg.sample_rate], *gate_signals(cfg)]
    out = tmp_path / "fbank.onnx"
    torch.onnx.export(FbankGraph(cfg).eval(), (torch.zeros(1, 8000), torch.tensor([8000])), str(out), dynamo=False,
                      opset_version=17, input_names=["w", "n"], output_names=["f", "t"],
                      dynamic_axes={"w": {0: "B", 1: "N"}, "n": {0: "B"}, "f": {1: "T"}})
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for w in waves:
        want = fbank(w, cfg)
        got, frames = sess.run(None, {"w": w[None], "n": np.array([len(w)], np.int64)})
        assert got.shape[1] == int(frames[0]) == len(want)
        np.testing.assert_allclose(got[0], want, atol=2e-3, rtol=0)


def test_fbank_graph_refuses_dither():
    from hpc_asr.config import FeatureConfig
    from hpc_asr.deploy.variants import FbankGraph

    with pytest.raises(ValueError, match="dither"):
        FbankGraph(FeatureConfig(dither=1.0))
