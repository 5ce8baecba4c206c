"""Gradient accumulation (train.accum_steps): k micro-batches make the same step as one k-times
larger batch, a window cut short by the epoch's end still steps, and a resume continues a
window-aligned run exactly; on 2 ranks the same holds through Horovod's backward_passes_per_step
and DDP's no_sync."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mpirun_cmd, run
from helpers import TEXTS, make_feature_dir, tiny_yaml
from test_train import TINY_MODEL, config
from test_train import _assert_same_run as assert_same_run

import hpc_asr.train.loop as train_mod
from hpc_asr import checkpoint

FRAMES = 400  # every fixture utterance is shorter: max_frames never splits a batch below max_utts


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> dict[str, Path]:
    """4 training utterances: with max_utts 2 the epoch is 2 micro-batches, with max_utts 4 one
    batch holding the same 4 utterances, so one accumulation window == one big batch."""
    root = tmp_path_factory.mktemp("accum")
    return {"train": make_feature_dir(root / "train", 4, TEXTS, seed=0, shards=1),
            "dev": make_feature_dir(root / "dev", 2, TEXTS[4:], seed=1, shards=1)}


def _train(dirs, out: Path, *extra: str) -> dict:
    return train_mod.train(config(dirs["train"], dirs["dev"], out, *TINY_MODEL, "--model.dropout", "0",
                                  "--specaug.enabled", "false", "--train.log_every", "1", "--train.epochs", "3",
                                  "--train.warmup_steps", "2", "--train.tensorboard", "false", *extra))


def _differing(a: dict, b: dict, atol: float = 1e-6) -> list[str]:
    """Weights that differ beyond float tolerance. The attention's key bias is left out: softmax is
    blind to it, so its true gradient is 0 and Adam blows rounding noise up to lr-sized steps."""
    def comparable(sd: dict) -> dict:
        out = {k: v for k, v in sd.items() if v.is_floating_point()}
        for k in [k for k in out if k.endswith("attn.qkv.bias")]:
            d = out[k].shape[0] // 3
            out[k] = torch.cat([out[k][:d], out[k][2 * d :]])  # query and value biases
        return out

    a, b = comparable(a), comparable(b)
    return [k for k in a if not torch.allclose(a[k], b[k], rtol=1e-4, atol=atol)]


def test_accum_steps_k_equals_one_k_times_larger_batch(four, tmp_path):
    """accum_steps 2 over batches of 2 == accum_steps 1 over the batch of 4 (same global batch,
    so the same lr): same losses, same gradient norms, same weights within float tolerance."""
    small = _train(four, tmp_path / "k2", "--data.max_utts", "2", "--data.max_frames", str(FRAMES),
                   "--train.accum_steps", "2")
    big = _train(four, tmp_path / "k1", "--data.max_utts", "4", "--data.max_frames", str(2 * FRAMES),
                 "--train.accum_steps", "1")
    assert small["steps"] == big["steps"] == 3  # one optimizer step per epoch in both
    hs, hb = small["history"], big["history"]
    assert [h["lr"] for h in hs] == [h["lr"] for h in hb]
    np.testing.assert_allclose([h["loss"] for h in hs], [h["loss"] for h in hb], rtol=1e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in hs], [h["grad_norm"] for h in hb], rtol=1e-4)
    a, b = checkpoint.load(tmp_path / "k2" / "last.pt"), checkpoint.load(tmp_path / "k1" / "last.pt")
    assert not _differing(a["model"], b["model"])
    assert hb[0]["grad_norm"] > 0 and hb[-1]["loss"] < hb[0]["loss"]  # the steps really moved the weights


def test_a_window_cut_short_by_the_epoch_end_steps(four, tmp_path):
    """4 micro-batches, accum_steps 3: each epoch is a window of 3 and one of 1; the short one
    steps in its own epoch (it neither vanishes nor leaks into the next epoch's first window)."""
    s = _train(four, tmp_path / "k3", "--data.max_utts", "1", "--data.max_frames", str(FRAMES),
               "--train.accum_steps", "3")
    assert s["steps"] == 6 and [h["epoch"] for h in s["history"]] == [0, 0, 1, 1, 2, 2]
    assert all(h["grad_norm"] > 0 for h in s["history"])


def test_a_signal_mid_window_finishes_the_window_and_resumes_exactly(four, tmp_path, monkeypatch):
    """SIGTERM during the second micro-batch of a 3-batch window: the window completes, steps and is
    checkpointed; the relaunch (short window, then two more epochs) ends bitwise equal to a run
    that was never interrupted."""
    args = ("--data.max_utts", "1", "--data.max_frames", str(FRAMES), "--train.accum_steps", "3",
            "--model.dropout", "0.1", "--specaug.enabled", "true")
    straight = _train(four, tmp_path / "straight", *args)
    real, calls = train_mod._forward_backward, []

    def signal_on_the_second(run, batch, gstep, boundary):
        calls.append(boundary)
        if len(calls) == 2:
            assert not boundary  # mid-window
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run, batch, gstep, boundary)

    split = tmp_path / "split"
    monkeypatch.setattr(train_mod, "_forward_backward", signal_on_the_second)
    with pytest.raises(train_mod.Preempted):
        _train(four, split, *args)
    monkeypatch.setattr(train_mod, "_forward_backward", real)
    assert calls == [False, False, True]  # the window ran to its end before the checkpoint
    pos = checkpoint.load(split / "last.pt")["position"]
    assert (pos["epoch"], pos["batch"], pos["step"]) == (0, 3, 1)
    again = _train(four, split, *args)
    assert again["steps"] == straight["steps"] == 6
    assert_same_run(tmp_path / "straight", split)


@pytest.mark.slow  # two 2-rank runs under mpirun
@pytest.mark.parametrize("engine", ["horovod", "torch"])  # backward_passes_per_step / DDP no_sync
def test_two_ranks_accumulating_equal_one_process_with_the_whole_batch(four, tmp_path, engine):
    """2 ranks x accum_steps 2 x 1 utterance == 1 process x 1 batch of 4: the engine must hold the
    allreduce until the window's last backward and average over ranks and micro-batches alike."""
    big = _train(four, tmp_path / "big", "--data.max_utts", "4", "--data.max_frames", str(4 * FRAMES),
                 "--train.lr", "1e-3")
    cfg = tiny_yaml(tmp_path / "k2.yaml", four["train"], four["dev"], tmp_path / "k2",
                    data={"max_utts": 1, "max_frames": FRAMES}, model={"dropout": 0.0},
                    train={"epochs": 3, "warmup_steps": 2, "accum_steps": 2, "tensorboard": False},
                    dist={"engine": engine, "compression": "none"})
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg)), timeout=300)
    two = checkpoint.load(tmp_path / "k2" / "last.pt")
    h2, hb = two["position"]["history"], big["history"]
    assert [h["step"] for h in h2] == [h["step"] for h in hb] == [1, 2, 3]
    np.testing.assert_allclose([h["loss"] for h in h2], [h["loss"] for h in hb], rtol=1e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in h2], [h["grad_norm"] for h in hb], rtol=1e-4)
    assert not _differing(two["model"], checkpoint.load(tmp_path / "big" / "last.pt")["model"])
