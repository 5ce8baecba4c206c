"""The n-gram LM: a proper distribution, readable by KenLM, built and tuned by its CLI, and it
lowers dev WER of a small trained model."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
from conftest import mpirun_cmd, run
from helpers import make_feature_dir, tiny_yaml

import hpc_asr.train.loop as train_mod
from hpc_asr.cli import load_config
from hpc_asr.decode.ngram import BOS, EOS, UNK, Arpa, build_arpa, kneser_ney

WORDS = "set a timer for ten minutes play some jazz turn the lights off call mom what time is it open door".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(n)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_history_is_a_distribution(tmp_path, order):
    """Sum over the vocabulary (</s> and <unk> included) of p(w | h) is 1 for seen, unseen and
    partly seen histories: discounts and backoff weights are consistent."""
    build_arpa(sentences(300, 0), order, tmp_path / "lm.arpa")
    lm = Arpa(tmp_path / "lm.arpa")
    vocab = [*lm.words, EOS, UNK]
    assert lm.order == order and sorted(lm.words) == sorted(set(WORDS))
    for h in [(), (BOS,), ("set", "a"), ("zzz", "timer"), (BOS, "play"), ("jazz",), ("a", "b", "c")]:
        total = sum(10 ** lm.log10_prob(w, h) for w in vocab)
        assert total == pytest.approx(1.0, abs=2e-5), (h, total)


def test_kneser_ney_continuation_counts():
    """'francisco' follows only 'san': frequent as a word but its unigram (continuation)
    probability is below that of a word seen after many different words."""
    text = ["san francisco"] * 20 + ["a dog", "the dog", "my dog", "big dog"]
    probs, _ = kneser_ney(text, 2)
    assert probs[0][("francisco",)] < probs[0][("dog",)]
    assert probs[1][("san", "francisco")] > 0.9


def test_kenlm_loads_our_arpa_and_agrees(tmp_path):
    """The decoder's KenLM reads the file and scores sentences as our own backoff query does."""
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    build_arpa(sentences(200, 1), 3, tmp_path / "lm.arpa")
    ours = Arpa(tmp_path / "lm.arpa")
    d = Dictionary()
    for w in [*ours.words, EOS, UNK]:
        d.add_entry(w)
    kenlm = KenLM(str(tmp_path / "lm.arpa"), d)
    for sent in ["set a timer", "call mom now", "the the the"]:
        state, theirs, h, mine = kenlm.start(False), 0.0, (BOS,), 0.0
        for w in sent.split():
            state, s = kenlm.score(state, d.get_index(w if w in ours.words else UNK))
            theirs += s
            mine += ours.log10_prob(w, h)
            h = (*h, w)
        assert theirs == pytest.approx(mine, abs=1e-4), sent


def test_cli_builds_from_manifest_and_bad_input_is_one_line(tmp_path):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"u{i}", "audio": "x.wav", "duration": 1.0, "text": t,
                                            "speaker": "s"}) + "\n" for i, t in enumerate(sentences(30, 2))))
    ok = run([sys.executable, "-m", "hpc_asr", "lm", "--manifest", str(manifest), "--order", "3",
              "--out", str(tmp_path / "lm" / "lm.arpa")], timeout=60)
    assert "order 3" in ok.stderr and Arpa(tmp_path / "lm" / "lm.arpa").order == 3
    bad = run([sys.executable, "-m", "hpc_asr", "lm", "--manifest", str(tmp_path / "nope.jsonl"),
               "--out", str(tmp_path / "x.arpa")], timeout=60, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope.jsonl" in bad.stderr


def test_lm_lowers_dev_wer_of_a_small_trained_model(tmp_path):
    """Train a tiny model briefly (it still misspells), build the LM from the training
    transcripts, tune on dev: beam+LM beats greedy on dev, and with the dev-tuned weights on a
    separate test split too. ~10 s."""
    train, seen = sentences(60, 3), set()
    seen.update(train)
    held = [s for s in sentences(300, 4) if s not in seen]
    tr = make_feature_dir(tmp_path / "train", 60, train, seed=0, shards=1)
    dev = make_feature_dir(tmp_path / "dev", 24, held[:24], seed=1, shards=1)
    test = make_feature_dir(tmp_path / "test", 24, held[24:48], seed=2, shards=1)
    y = tiny_yaml(tmp_path / "c.yaml", tr, dev, tmp_path / "run", dist={"engine": "none"},
                  data={"max_utts": 8, "max_frames": 4000},
                  model={"subsampling": "conv1d", "d_model": 32, "n_heads": 2, "n_layers": 1, "ff_mult": 2,
                         "conv_kernel": 5, "dropout": 0.0},
                  train={"epochs": 4, "lr": 5e-3, "warmup_steps": 5, "log_every": 50, "threads": 1,
                         "tensorboard": False, "progress": False})
    train_mod.train(load_config(y))
    ckpt = str(tmp_path / "run" / "last.pt")
    lm_dir = tmp_path / "run" / "lm"  # beside the model, where evaluate looks by default
    build_arpa(train, 2, lm_dir / "lm.arpa")
    run([sys.executable, "-m", "hpc_asr", "lm", "tune", "--checkpoint", ckpt, "--data", str(dev),
         "--lm", str(lm_dir), "--beam-size", "16"], timeout=120)
    tuned = json.loads((lm_dir / "decode.json").read_text())
    assert tuned["dev_wer_greedy"] > 0.05, "the model is too good to show anything"
    assert tuned["dev_wer"] < tuned["dev_wer_greedy"], tuned
    res = {}
    for kind in ("greedy", "beam+lm"):
        run([sys.executable, "-m", "hpc_asr", "evaluate", "--checkpoint", ckpt, "--data", str(test),
             "--decoder", kind, "--out", str(tmp_path / f"{kind}.json")], timeout=120)
        res[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    assert res["beam+lm"]["tuned_on_dev"] and res["beam+lm"]["lm_weight"] == tuned["lm_weight"]
    assert res["beam+lm"]["wer"] < res["greedy"]["wer"], (res["beam+lm"]["wer"], res["greedy"]["wer"])
    assert math.isfinite(res["beam+lm"]["loss"]) and Path(res["beam+lm"]["lm"]).name == "lm.arpa"


# ---- tuning runs where the model is (defect 3: batches went to cuda:0, the model stayed on the CPU)

def _tiny_tuning_setup(tmp_path: Path) -> tuple[str, Path, Path]:
    from test_evaluate import tiny_checkpoint

    dev = make_feature_dir(tmp_path / "dev", 6, ["set a timer", "play jazz", "call mom"], seed=1, shards=1)
    build_arpa(["set a timer", "play some jazz", "call mom"], 2, tmp_path / "lm" / "lm.arpa")
    return str(tiny_checkpoint(tmp_path / "m.pt")), dev, tmp_path / "lm" / "lm.arpa"


def test_posteriors_are_computed_where_the_model_is(tmp_path):
    """posteriors() sends each batch to the model's device (no engine decides it): a model on the
    CPU gives exactly its own forward pass on the same batch."""
    import torch

    from hpc_asr.data.loader import collate
    from hpc_asr.decode.evaluate import load_model_and_data, posteriors

    ckpt, dev, _ = _tiny_tuning_setup(tmp_path)
    model, tok, cfg, data = load_model_and_data(ckpt, str(dev))
    assert next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        outs = list(posteriors(model, data, tok, cfg, list(range(len(data)))))
        assert sorted(i for idx, *_ in outs for i in idx) == list(range(len(data)))
        for idx, lp, lens, _ in outs:
            batch = collate([data[i] for i in idx], data.texts, tok)
            ref, ref_lens = model(batch.feats, batch.feat_lens)
            assert lp.device.type == "cpu" and torch.equal(lens, ref_lens) and torch.allclose(lp, ref.float())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_tune_runs_on_a_cuda_node(tmp_path):
    """Where CUDA is visible `lm tune` (and so `make demo`) failed: batches on cuda:0, model on the CPU."""
    from hpc_asr.decode.tune import tune

    ckpt, dev, arpa = _tiny_tuning_setup(tmp_path)
    res = tune(ckpt, str(dev), arpa, [0.0, 0.5], [0.0, 1.0], beam=4)
    assert res["dev_utterances"] == 6 and len(res["grid"]) == 4
    assert res["dev_wer"] == min(g["dev_wer"] for g in res["grid"]) and math.isfinite(res["dev_wer_greedy"])


def test_tune_cli_ties_decode_json_and_evaluate_refuses_another_lm(tmp_path):
    """`lm tune` writes decode.json (atomically) with the LM's and the checkpoint's SHA-256;
    after the LM is rebuilt, evaluating with beam+lm stops with one line instead of silently
    using weights tuned for the old LM."""
    import hashlib

    ckpt, dev, arpa = _tiny_tuning_setup(tmp_path)
    run([sys.executable, "-m", "hpc_asr", "lm", "tune", "--checkpoint", ckpt, "--data", str(dev), "--lm",
         str(arpa.parent), "--lm-weights", "0,0.5", "--word-scores", "0", "--beam-size", "4"], timeout=120)
    tuned = json.loads((arpa.parent / "decode.json").read_text())
    assert tuned["arpa_sha256"] == hashlib.sha256(arpa.read_bytes()).hexdigest()
    assert tuned["checkpoint_sha256"] == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    assert not list(arpa.parent.glob(".decode.json.tmp*"))
    args = [sys.executable, "-m", "hpc_asr", "evaluate", "--checkpoint", ckpt, "--data", str(dev), "--decoder",
            "beam+lm", "--lm", str(arpa.parent), "--decode.beam_size", "4"]
    ok = run([*args, "--out", str(tmp_path / "e.json")], timeout=120)
    assert "warning" not in ok.stderr
    assert json.loads((tmp_path / "e.json").read_text())["tuned_on_this_checkpoint"] is True
    build_arpa(["set a timer", "stop"], 2, arpa)
    bad = run(args, timeout=120, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "decode.json: tuned for another LM" in bad.stderr


def test_tune_under_mpirun_splits_the_grid_and_agrees_with_one_process(tmp_path):
    """`mpirun -np 2 hpc-asr lm tune`: each rank scores half of the grid points and rank 0 writes
    the whole grid, point for point what one process finds, in the grid's order; the token beam
    is recorded."""
    ckpt, dev, arpa = _tiny_tuning_setup(tmp_path)
    args = ["-m", "hpc_asr", "lm", "tune", "--checkpoint", ckpt, "--data", str(dev), "--lm", str(arpa.parent),
            "--lm-weights", "0,0.5,1", "--word-scores", "-1,0,1", "--beam-size", "8", "--token-beam", "6"]
    run([sys.executable, *args], timeout=120)
    one = json.loads((arpa.parent / "decode.json").read_text())
    run(mpirun_cmd(2, *args), timeout=240)
    two = json.loads((arpa.parent / "decode.json").read_text())
    assert (one["ranks"], two["ranks"], two["token_beam"]) == (1, 2, 6)
    assert two["grid"] == one["grid"] and len(two["grid"]) == 9
    assert [(g["lm_weight"], g["word_score"]) for g in two["grid"]][:4] == [(0, -1), (0, 0), (0, 1), (0.5, -1)]
    assert (two["lm_weight"], two["word_score"], two["dev_wer"]) == (one["lm_weight"], one["word_score"],
                                                                      one["dev_wer"])
    bad = run([sys.executable, *args[:-2], "--token-beam", "-1"], timeout=60, check=False)
    assert bad.returncode == 2 and "--token-beam: must be >= 0" in bad.stderr and "Traceback" not in bad.stderr

