"""hpc_asr.decode.evaluate as users run it: any utterance length, any launcher, every decoder, and the
error breakdown in the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mpirun_cmd, run
from helpers import make_feature_dir

from data_prep.fbank import run as fbank_run
from data_prep.recipes import librispeech
from hpc_asr import checkpoint
from hpc_asr.config import Config
from hpc_asr.data.manifest import write_manifest
from hpc_asr.data.tokenizer import CharTokenizer
from hpc_asr.decode.evaluate import apply_overrides, eval_batches
from hpc_asr.dist.launch import World
from hpc_asr.model import ConformerCTC

MAX_FRAMES = 400  # the checkpoint's data.max_frames: every fixture utterance is longer


def tiny_checkpoint(path: Path, max_frames: int = MAX_FRAMES) -> Path:
    """An untrained but complete checkpoint (what training writes), small enough to load fast."""
    tok = CharTokenizer()
    cfg = Config.from_dict({
        "data": {"max_frames": max_frames, "max_utts": 4},
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "ff_mult": 2, "conv_kernel": 5,
                  "subsampling": "conv1d", "vocab_size": tok.vocab_size},
        "dist": {"engine": "horovod"},
    })
    torch.manual_seed(0)
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    checkpoint.save(path, {"config": cfg.to_dict(), "model": model.state_dict(), "tokenizer": tok.state_dict()})
    return path


@pytest.fixture(scope="module")
def real_fixture(tmp_path_factory, librispeech_dir) -> dict:
    """The 4 real LibriSpeech utterances featurized with the prep library, and a checkpoint whose
    data.max_frames is below all of them."""
    tmp = tmp_path_factory.mktemp("evalreal")
    utts = librispeech.read_subset(librispeech.subset_dir(librispeech_dir, "test-clean"))
    write_manifest(tmp / "real.jsonl", utts)
    fbank_run(tmp / "real.jsonl", tmp / "fbank", Config().features, World(), None)
    return {"data": tmp / "fbank", "ckpt": tiny_checkpoint(tmp / "model" / "last.pt"), "n": len(utts),
            "longest_s": max(u.duration for u in utts)}


def test_eval_batches_put_a_too_long_utterance_alone():
    frames = [120, 5000, 80, 90, 30]
    batches = eval_batches(frames, max_frames=300, max_utts=8)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert [1] in batches
    for b in batches:
        assert len(b) == 1 or max(frames[i] for i in b) * len(b) <= 300


def test_evaluate_scores_utterances_longer_than_the_checkpoints_max_frames(real_fixture, tmp_path):
    """Defect 12: a split holding an utterance above data.max_frames ended in a traceback."""
    assert real_fixture["longest_s"] * 100 > MAX_FRAMES
    out = tmp_path / "eval.json"
    proc = run([sys.executable, "-m", "hpc_asr", "evaluate", "--checkpoint", str(real_fixture["ckpt"]),
                "--data", str(real_fixture["data"]), "--out", str(out)], timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["utterances"] == real_fixture["n"] == len(res["hypotheses"])
    for k in ("substitutions", "deletions", "insertions", "frequent_errors"):
        assert k in res
    assert res["substitutions"] + res["deletions"] + res["insertions"] == res["word_errors"]
    # scored whole, not cropped: the same as a run whose batches may hold anything
    big = tmp_path / "big.json"
    run([sys.executable, "-m", "hpc_asr", "evaluate", "--checkpoint", str(real_fixture["ckpt"]), "--data",
         str(real_fixture["data"]), "--data.max_frames", "1000000", "--out", str(big)], timeout=120)
    whole = json.loads(big.read_text())
    assert res["hypotheses"] == whole["hypotheses"] and res["chars"] == whole["chars"] > 0
    assert res["loss"] == pytest.approx(whole["loss"], rel=1e-4)


def test_evaluate_reads_through_the_training_loader_in_worker_processes(real_fixture, tmp_path):
    """Evaluation uses data.make_eval_loader: batches read in a worker process score the same."""
    res = {}
    for workers in ("0", "1"):
        out = tmp_path / f"eval{workers}.json"
        proc = run([sys.executable, "-m", "hpc_asr", "evaluate", "--checkpoint", str(real_fixture["ckpt"]),
                    "--data", str(real_fixture["data"]), "--data.num_workers", workers, "--out", str(out)],
                   timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        res[workers] = json.loads(out.read_text())
    assert res["0"]["hypotheses"] == res["1"]["hypotheses"] and res["0"]["loss"] == res["1"]["loss"]


def test_evaluate_accepts_data_max_frames_and_rejects_model_overrides(real_fixture, tmp_path):
    args = [sys.executable, "-m", "hpc_asr", "evaluate", "--checkpoint", str(real_fixture["ckpt"]),
            "--data", str(real_fixture["data"])]
    ok = run([*args, "--data.max_frames", "100000", "--out", str(tmp_path / "e.json")], timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    bad = run([*args, "--model.d_model", "64"], timeout=120, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "model.d_model" in bad.stderr


def test_apply_overrides_sets_data_dist_decode_only():
    cfg = apply_overrides(Config(), ["--data.max_frames", "99", "--decode.decoder=beam", "--dist.engine", "none"])
    assert (cfg.data.max_frames, cfg.decode.decoder, cfg.dist.engine) == (99, "beam", "none")


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory) -> dict:
    """A tiny model overfitted on 6 synthetic utterances (as in test_train): distinct, non-empty,
    mostly right hypotheses, so utterances mixed up between ranks show."""
    import hpc_asr.train.loop as train_mod
    from hpc_asr.cli import load_config

    root = tmp_path_factory.mktemp("trained")
    data = make_feature_dir(root / "six", 6, ["yes", "no", "stop", "go home", "play jazz", "call bob"], seed=3)
    train_mod.train(load_config(None, [
        "--data.train", str(data), "--data.dev", str(data), "--train.out_dir", str(root / "run"),
        "--dist.engine", "none", "--train.threads", "1", "--data.max_utts", "6", "--specaug.enabled", "false",
        "--model.d_model", "64", "--model.n_heads", "4", "--model.n_layers", "2", "--model.subsample_channels", "16",
        "--model.conv_kernel", "7", "--model.dropout", "0", "--train.epochs", "40", "--train.lr", "5e-3",
        "--train.warmup_steps", "10", "--train.weight_decay", "0", "--train.tensorboard", "false"]))
    return {"data": data, "ckpt": root / "run" / "last.pt"}


def test_evaluate_under_mpirun_two_ranks(trained_tiny, tmp_path):
    """Defect 10 (evaluate part): `mpirun -np 2 python -m hpc_asr evaluate` died with a traceback.
    A trained model's hypotheses differ per utterance, so ids and hypotheses crossed between
    ranks (or a rank's share counted twice) would not match the one-process run."""
    out = tmp_path / "eval2.json"
    args = ["-m", "hpc_asr", "evaluate", "--checkpoint", str(trained_tiny["ckpt"]), "--data", str(trained_tiny["data"])]
    proc = run(mpirun_cmd(2, *args, "--out", str(out)), timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    one = tmp_path / "eval1.json"
    run([sys.executable, *args, "--out", str(one)], timeout=120)
    two, single = json.loads(out.read_text()), json.loads(one.read_text())
    assert two["utterances"] == 6 and two["words"] == 9
    hyps = [h["hyp"] for h in single["hypotheses"].values()]
    assert all(hyps) and len(set(hyps)) == 6, single["hypotheses"]  # distinct and non-empty
    right = [i for i, h in single["hypotheses"].items() if h["hyp"] == h["ref"]]
    assert len(right) >= 4, single["hypotheses"]  # each hypothesis sits with its own utterance
    assert two["hypotheses"] == single["hypotheses"]
    for k in ("word_errors", "words", "char_errors", "chars"):
        assert two[k] == single[k], k
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_too_short_utterance_is_scored_as_empty(tmp_path):
    """An utterance shorter than the subsampling's receptive field is scored (all deletions)."""
    d = make_feature_dir(tmp_path / "f", 3, ["yes", "go home", "stop"])
    from hpc_asr.data.loader import FeatureSet
    from hpc_asr.decode.evaluate import evaluate
    from hpc_asr.dist.engines import Engine

    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    model, tok, cfg = checkpoint.load_model(ckpt)
    data = FeatureSet(d)
    data.num_frames = np.array([3, *data.num_frames[1:]])  # first one: 3 frames, too few for 4x
    res = evaluate(model, data, tok, Engine(World()), cfg, keep_hyps=True)
    assert res["utterances"] == 3
    assert res["hypotheses"][data.ids[0]]["hyp"] == ""
    short_ref = res["hypotheses"][data.ids[0]]["ref"]
    assert short_ref == data.texts[0] and short_ref.split()
    # its reference words count in the totals (yes + go home + stop) and are deleted
    assert res["words"] == 4 and res["deletions"] >= len(short_ref.split())
    assert res["chars"] == len("yes") + len("go home") + len("stop")


def test_evaluate_refuses_features_the_model_was_not_trained_on(tmp_path):
    """A split featurized with other settings would score plausibly but wrongly: one line, exit 2."""
    from hpc_asr.decode.evaluate import load_model_and_data

    data = make_feature_dir(tmp_path / "f", 2, ["yes", "stop"], shards=1)
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    assert load_model_and_data(str(ckpt), str(data))[3].features == Config().features  # the same: accepted
    state = checkpoint.load(ckpt)
    state["config"]["features"]["low_freq"] = 60.0  # the model's mel filterbank starts elsewhere
    checkpoint.save(tmp_path / "other.pt", state)
    with pytest.raises(ValueError, match=r"differ from the model's"):
        load_model_and_data(str(tmp_path / "other.pt"), str(data))
    proc = run([sys.executable, "-m", "hpc_asr", "evaluate", "--checkpoint", str(tmp_path / "other.pt"),
                "--data", str(data), "--out", str(tmp_path / "e.json")], timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert str(data) in proc.stderr and "low_freq" in proc.stderr and not (tmp_path / "e.json").exists()


def test_latency_recognizer_decodes_with_the_lm_beside_the_export(real_fixture, tmp_path):
    """The deployable Recognizer runs beam+LM: words only from the LM's vocabulary."""
    from hpc_asr.bench.latency import measure
    from hpc_asr.decode.ngram import build_arpa
    from hpc_asr.deploy.recognizer import Recognizer

    out = tmp_path / "export"
    run([sys.executable, "-m", "hpc_asr", "export", "--checkpoint", str(real_fixture["ckpt"]),
         "--data", str(real_fixture["data"]), "--out-dir", str(out), "--max-utts", "1"], timeout=300)
    build_arpa(["call mom", "play jazz", "stop"], 2, out / "lm" / "lm.arpa")
    rec = Recognizer(out, threads=1, decoder="beam+lm")
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    assert set(rec(wave).split()) <= {"call", "mom", "play", "jazz", "stop"}
    assert measure(rec, [wave, wave], warmup=1)["utterances"] == 2
    with pytest.raises(FileNotFoundError):
        Recognizer(out, decoder="beam+lm", lm=str(tmp_path / "none"))

    # A known posterior in place of the network's: acoustics say "stap", the LM beside the export says "stop".
    tok = rec.tokenizer
    probs = np.full((8, tok.vocab_size), 1e-4)
    for t, c in enumerate("stap"):
        probs[2 * t, tok.encode(c)[0]], probs[2 * t + 1, tok.blank] = 0.9, 0.9
    probs[4, tok.encode("o")[0]] = 0.4  # "a" 0.9 against "o" 0.4: greedy reads "stap"
    lp = np.log(probs / probs.sum(1, keepdims=True)).astype(np.float32)

    class KnownPosterior:
        def run(self, outputs, feeds):
            return [lp[None], np.array([len(lp)])]

    greedy = Recognizer(out, threads=1, decoder="greedy")
    greedy.session = rec.session = KnownPosterior()
    feats = np.zeros((40, rec.features.num_mel_bins), np.float32)
    assert greedy.decode_features(feats) == "stap" and rec.decode_features(feats) == "stop"

@pytest.mark.parametrize("dist", [{"engine": "horovod", "elastic": True}, {"engine": "torch"}],
                         ids=["elastic", "torch"])
def test_evaluation_picks_its_own_engine_whatever_training_used(real_fixture, tmp_path, dist):
    """A model trained with the elastic engine (horovodrun --min-np) or with torch.distributed
    is evaluated under plain python and under mpirun -np 2: the engine is this launch's, not the
    checkpoint's dist section, and both launches score the same."""
    state = checkpoint.load(real_fixture["ckpt"])
    state["config"]["dist"].update(dist)
    ckpt = tmp_path / "trained_elsewhere.pt"
    checkpoint.save(ckpt, state)
    args = ["-m", "hpc_asr", "evaluate", "--checkpoint", str(ckpt), "--data", str(real_fixture["data"])]
    one = run([sys.executable, *args, "--out", str(tmp_path / "one.json")], timeout=120, check=False)
    assert one.returncode == 0, one.stderr
    two = run(mpirun_cmd(2, *args, "--out", str(tmp_path / "two.json")), timeout=180, check=False)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["utterances"] == b["utterances"] == real_fixture["n"] and a["hypotheses"] == b["hypotheses"]


@pytest.mark.parametrize("train", [{"precision": "bf16"}, {"amp": True}], ids=["bf16", "amp_on_cpu"])
def test_a_bf16_checkpoint_is_scored_under_bf16_autocast(tmp_path, train):
    """Scoring uses the precision training used (TrainConfig.autocast_dtype, the one owner): a
    bf16 run (or the legacy amp switch, bf16 on CPU) gives exactly the bf16-autocast forward pass,
    not an fp16 or fp32 one."""
    from hpc_asr.data.loader import collate
    from hpc_asr.decode.evaluate import load_model_and_data, posteriors

    d = make_feature_dir(tmp_path / "f", 4, ["set a timer", "go home", "play jazz", "stop"])
    state = checkpoint.load(tiny_checkpoint(tmp_path / "m.pt"))
    state["config"]["train"].update(train)
    checkpoint.save(tmp_path / "bf16.pt", state)
    model, tok, cfg, data = load_model_and_data(str(tmp_path / "bf16.pt"), str(d))
    assert cfg.train.autocast_dtype("cpu") == torch.bfloat16

    def forward(batch, dtype):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(batch.feats, batch.feat_lens)[0].float()

    with torch.no_grad():
        for idx, lp, _, _ in posteriors(model, data, tok, cfg, list(range(len(data)))):
            batch = collate([data[i] for i in idx], data.texts, tok)
            assert torch.equal(lp, forward(batch, torch.bfloat16))
            assert not torch.equal(lp, forward(batch, torch.float16)) and not torch.equal(lp, forward(batch, None))
