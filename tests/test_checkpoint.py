"""Checkpoints: step checkpoints with keep-last-K, best-on-dev, weight averaging (library and
CLI), and tokenizers (characters, BPE) rebuilt from the checkpoint alone."""

from __future__ import annotations

import sys

import helpers
import pytest
import torch
from conftest import run
from test_train import TINY_MODEL, config

import hpc_asr.train.loop as train_mod
from hpc_asr import checkpoint

tiny_features = helpers.tiny_features


def _train(tiny_features, out, *extra):
    return train_mod.train(config(tiny_features["train"], tiny_features["dev"], out, *TINY_MODEL,
                                  "--data.max_utts", "2", "--train.epochs", "2", "--train.log_every", "1",
                                  "--train.tensorboard", "false", *extra))


def test_step_checkpoints_keep_last_best_and_average(tiny_features, tmp_path):
    out = tmp_path / "run"
    summary = _train(tiny_features, out, "--train.ckpt_every_steps", "1", "--train.keep_last", "2",
                     "--train.average_last", "2")
    steps = summary["steps"]
    assert steps == 8  # 8 utterances, 2 per batch, 2 epochs
    kept = sorted(p.name for p in out.glob("step-*.pt"))
    assert kept == [f"step-{steps - 1:08d}.pt", f"step-{steps:08d}.pt"]
    older = checkpoint.load(out / kept[0])
    assert older["position"]["step"] == steps - 1  # a snapshot, not a link that moved on

    newer = checkpoint.load(out / kept[1])
    avg = checkpoint.load(out / "avg.pt")
    for k, v in newer["model"].items():
        if v.is_floating_point():
            want = ((older["model"][k].double() + v.double()) / 2).to(v.dtype)
            assert torch.equal(avg["model"][k], want), k
    assert any(not torch.equal(older["model"][k], newer["model"][k]) for k in newer["model"])
    model, _, _ = checkpoint.load_model(out / "avg.pt")  # usable as a model
    assert model.num_params() == summary["params"]

    best = checkpoint.load(out / "best.pt")["position"]
    devs = summary["dev"]
    want = min(devs, key=lambda d: (d["wer"], d["loss"]))
    assert summary["best"]["step"] == want["step"] and best["best"]["step"] == want["step"]
    assert best["step"] == want["step"]  # best.pt holds the weights that scored best


def test_best_stays_at_an_earlier_epoch_that_scored_better(tiny_features, tmp_path):
    """Inside warmup the dev loss always falls, so "copy last.pt to best.pt" would look right: a
    resume with a destructive lr makes the second epoch worse, and best.pt must stay behind."""
    out = tmp_path / "run"
    _train(tiny_features, out, "--train.epochs", "1")
    summary = _train(tiny_features, out, "--train.lr", "30")
    first, second = summary["dev"]
    assert (second["wer"], second["loss"]) > (first["wer"], first["loss"]), summary["dev"]
    assert summary["best"]["step"] == first["step"] == 4 and summary["steps"] == 8
    best, last = checkpoint.load(out / "best.pt"), checkpoint.load(out / "last.pt")
    assert best["position"]["step"] == 4 and last["position"]["step"] == 8
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_average_cli(tiny_features, tmp_path):
    out = tmp_path / "run"
    _train(tiny_features, out, "--train.ckpt_every_steps", "3", "--train.keep_last", "5")
    ckpts = sorted(out.glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-00000003.pt", "step-00000006.pt"]
    run([sys.executable, "-m", "hpc_asr", "checkpoint", "average", "--out", str(tmp_path / "avg.pt"),
         *map(str, ckpts)])
    a, b = (checkpoint.load(p)["model"] for p in ckpts)
    avg = checkpoint.load(tmp_path / "avg.pt")["model"]
    w = "layers.0.ff1.net.0.weight"
    assert torch.equal(avg[w], ((a[w].double() + b[w].double()) / 2).float())

    bad = run([sys.executable, "-m", "hpc_asr", "checkpoint", "average", "--out", str(tmp_path / "x.pt"),
               str(tmp_path / "missing.pt")], check=False)
    assert bad.returncode == 2 and "missing.pt: checkpoint not found" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_travels_in_the_checkpoint(tiny_features, tmp_path, kind):
    out = tmp_path / kind
    _train(tiny_features, out, "--train.tokenizer", kind, "--train.bpe_vocab_size", "40",
           "--train.max_steps", "2")
    state = checkpoint.load(out / "last.pt")
    assert state["tokenizer"]["type"] == kind
    model, tok, cfg = checkpoint.load_model(out / "last.pt")
    assert cfg.model.vocab_size == tok.vocab_size == model.ctc.out_features
    text = "turn it up"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if kind == "bpe":
        assert len(ids) < len(text)  # pieces longer than one character were learned
        assert isinstance(state["tokenizer"]["model_proto"], bytes)


def test_average_refuses_different_models(tmp_path):
    from hpc_asr.config import Config
    from hpc_asr.data.tokenizer import CharTokenizer
    from hpc_asr.model import ConformerCTC

    def save(name: str, **model) -> str:
        tok = CharTokenizer()
        cfg = Config.from_dict({"model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "ff_mult": 2, "conv_kernel": 5,
                                          "vocab_size": tok.vocab_size, **model}})
        m = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
        checkpoint.save(tmp_path / name, {"config": cfg.to_dict(), "model": m.state_dict(),
                                          "tokenizer": tok.state_dict()})
        return str(tmp_path / name)

    a, a2 = save("a.pt"), save("a2.pt")
    assert checkpoint.average([a, a2])["averaged"] == [a, a2]  # the same architecture averages
    wider, deeper = save("wide.pt", d_model=48), save("deep.pt", n_layers=2)
    for other in (wider, deeper):  # different shapes, different keys
        with pytest.raises(checkpoint.CheckpointError, match=r"a different model than .*cannot average"):
            checkpoint.average([a, other])
    bad = run([sys.executable, "-m", "hpc_asr", "checkpoint", "average", "--out", str(tmp_path / "x.pt"), a, deeper],
              check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot average" in bad.stderr
    assert not (tmp_path / "x.pt").exists()


def test_resume_from_a_checkpoint_without_sched_step(tiny_features, tmp_path):
    """A last.pt written before the schedule step existed resumes on the lr curve it was on."""
    from test_train import _assert_same_run

    warm = ("--train.warmup_steps", "100")  # the lr does not depend on max_steps (see test_resume_mid_epoch)
    _train(tiny_features, tmp_path / "straight", *warm, "--train.max_steps", "4")
    old = tmp_path / "old"
    _train(tiny_features, old, *warm, "--train.max_steps", "2")
    state = checkpoint.load(old / "last.pt")
    assert state["position"]["sched_step"] == 2
    for k in ("sched_step", "gbatch"):
        del state["position"][k]
    checkpoint.save(old / "last.pt", state)
    _train(tiny_features, old, *warm, "--train.max_steps", "4")
    _assert_same_run(tmp_path / "straight", old)


def test_resume_reuses_the_checkpoints_bpe_tokenizer(tiny_features, tmp_path):
    """A resumed run encodes with the BPE model in last.pt, not one retrained from the data (which
    could differ, e.g. after a sentencepiece upgrade): here last.pt's is swapped for one trained on
    other text, and the run must carry on with it."""
    from helpers import TEXTS

    from hpc_asr.data.tokenizer import train_bpe

    out = tmp_path / "bpe"
    bpe = ("--train.tokenizer", "bpe", "--train.bpe_vocab_size", "40")
    _train(tiny_features, out, *bpe, "--train.max_steps", "2")
    state = checkpoint.load(out / "last.pt")
    other = train_bpe([" ".join(w[::-1] for w in t.split()) for t in TEXTS] * 3, 40).state_dict()
    assert other["model_proto"] != state["tokenizer"]["model_proto"]
    assert checkpoint.tokenizer_from_state(other).vocab_size == checkpoint.tokenizer_from_state(
        state["tokenizer"]).vocab_size  # the same output layer: only the pieces differ
    state["tokenizer"] = other
    checkpoint.save(out / "last.pt", state)
    _train(tiny_features, out, *bpe, "--train.max_steps", "4")
    assert checkpoint.load(out / "last.pt")["tokenizer"]["model_proto"] == other["model_proto"]


def test_tokenizer_json_sidecar_round_trip():
    import json

    from hpc_asr.data.tokenizer import CharTokenizer, from_state_dict, train_bpe

    for tok in (CharTokenizer(), train_bpe(["set a timer", "turn it up", "set the alarm"], 40)):
        again = from_state_dict(json.loads(json.dumps(tok.json_state())))
        assert again.encode("set it up") == tok.encode("set it up") and again.vocab_size == tok.vocab_size


@pytest.mark.parametrize("kind", ["pickled_module", "plain_tensor", "text"])
def test_not_a_checkpoint_is_one_line_naming_it(tmp_path, kind):
    """A whole pickled nn.Module (torch's weights_only refuses it with a page of advice), a torch
    file of something else, a text file: each is "not an hpc_asr checkpoint: PATH", in one line."""
    path = tmp_path / f"{kind}.pt"
    if kind == "pickled_module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "plain_tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_text("hello\n")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    assert str(e.value) == f"not an hpc_asr checkpoint: {path}"
    proc = run([sys.executable, "-m", "hpc_asr", "checkpoint", "average", "--out", str(tmp_path / "avg.pt"),
                str(path)], check=False)
    assert proc.returncode == 2 and proc.stderr == f"error: not an hpc_asr checkpoint: {path}\n", proc.stderr
