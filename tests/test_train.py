"""Training: a tiny model overfits, 2-rank Horovod keeps ranks identical, resume is exact, and the
real CLI runs under ``mpirun`` with both engines.

Everything uses ``train.threads 1``: on a busy 2-core machine, two intra-op threads per process
spin against other jobs and make a step ~40x slower.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from conftest import ROOT, mpirun_cmd, run, run_env
from helpers import TEXTS, make_feature_dir, tiny_yaml, wait_file

import hpc_asr.train.loop as train_mod
from hpc_asr import checkpoint
from hpc_asr.cli import load_config
from hpc_asr.data.loader import BucketBatchSampler, FeatureSet, collate
from hpc_asr.data.tokenizer import normalize
from hpc_asr.decode.ctc import greedy_batch
from hpc_asr.decode.wer import error_counts, rates
from hpc_asr.train import schedule

tiny_features = helpers.tiny_features  # the shared session fixture, by module attribute

TINY_MODEL = ["--model.d_model", "32", "--model.n_heads", "2", "--model.n_layers", "1", "--model.ff_mult", "2",
              "--model.conv_kernel", "5", "--model.subsample_channels", "8"]


def config(train_dir: Path, dev_dir: Path, out: Path, *overrides: str):
    return load_config(None, ["--data.train", str(train_dir), "--data.dev", str(dev_dir),
                              "--train.out_dir", str(out), "--dist.engine", "none", "--train.threads", "1",
                              *overrides])


def differing(a: dict, b: dict) -> list[str]:
    """Names whose tensors are not bitwise equal between two state dicts."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# ---- single process: the model can learn ---------------------------------------------------

def test_tiny_model_overfits(tmp_path):
    data = make_feature_dir(tmp_path / "six", 6, TEXTS[:6], seed=3, shards=2)
    out = tmp_path / "run"
    cfg = config(data, data, out, "--data.max_utts", "6", "--specaug.enabled", "false",
                 "--model.d_model", "64", "--model.n_heads", "4", "--model.n_layers", "2",
                 "--model.subsample_channels", "16", "--model.conv_kernel", "7", "--model.dropout", "0",
                 "--train.epochs", "40", "--train.lr", "5e-3", "--train.warmup_steps", "10",
                 "--train.weight_decay", "0", "--train.log_every", "5")
    summary = train_mod.train(cfg)

    assert summary["steps"] == 40  # one batch per epoch
    assert json.loads((out / "train_summary.json").read_text())["history"] == summary["history"]
    first, last = summary["history"][0]["loss"], summary["history"][-1]["loss"]
    assert last * 10 <= first, f"loss only went {first:.3f} -> {last:.3f}"

    model, tok, _ = checkpoint.load_model(out / "last.pt")
    fs = FeatureSet(data)
    batch = collate([fs[i] for i in range(len(fs))], fs.texts, tok)
    with torch.no_grad():
        lp, lens = model(batch.feats, batch.feat_lens)
    hyps, refs = greedy_batch(lp, lens, tok), [normalize(t) for t in fs.texts]
    _, cer = rates(error_counts(refs, hyps))
    assert cer <= 0.1, list(zip(refs, hyps, strict=True))
    assert summary["dev"][-1]["cer"] <= 0.1  # train's own evaluation (dev = train set here) agrees


# ---- Horovod, 2 ranks ----------------------------------------------------------------------

def test_horovod_fp16_allreduce_and_ranks_stay_identical(tiny_features, tmp_path):
    run(mpirun_cmd(2, str(ROOT / "tests" / "mpi_scripts" / "hvd_steps.py"), str(tiny_features["train"]),
                   str(tmp_path)), timeout=240)
    probe = [json.loads((tmp_path / f"allreduce.{r}.json").read_text()) for r in (0, 1)]
    assert probe[0]["size"] == 2

    # (i) One SGD(lr=1) step: w1 = w0 - mean(grad over ranks), the mean computed in fp16 on the wire.
    grads = [np.array(p["fp16"]["grad"], np.float32) for p in probe]
    assert not np.allclose(grads[0], grads[1])
    w0 = np.array(probe[0]["fp16"]["w0"], np.float32)
    mean32 = (grads[0] + grads[1]) * np.float32(0.5)
    mean16 = ((grads[0].astype(np.float16) + grads[1].astype(np.float16)) * np.float16(0.5)).astype(np.float32)
    assert not np.array_equal(mean16, mean32)  # the values are chosen so fp16 rounding shows
    for r, p in enumerate(probe):
        w1 = np.array(p["fp16"]["w1"], np.float32)
        np.testing.assert_allclose(w1, w0 - mean32, atol=2e-3, rtol=0)  # the average, to fp16 precision
        np.testing.assert_array_equal(w1, w0 - mean16)  # ... and exactly what fp16 compression gives
        assert np.abs(w1 - (w0 - grads[r])).max() > 0.1  # not this rank's own gradient
        w1_none = np.array(p["none"]["w1"], np.float32)  # without compression: the fp32 mean
        np.testing.assert_allclose(w1_none, w0 - mean32, atol=1e-7, rtol=0)
    assert probe[0]["fp16"]["w1"] == probe[1]["fp16"]["w1"]

    # (ii) Real steps on different batches per rank: weights agree bitwise after every step.
    res = [torch.load(tmp_path / f"train.{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(res[0]["batches"]) == len(res[1]["batches"]) >= 2
    assert not {i for b in res[0]["batches"] for i in b} & {i for b in res[1]["batches"] for i in b}
    assert differing(res[0]["init_own"], res[1]["init_own"])  # seeded differently on purpose ...
    not_broadcast = differing(res[0]["init"], res[1]["init"])  # ... until rank 0's state was broadcast
    assert not not_broadcast
    assert res[0]["losses"] != res[1]["losses"]  # each rank really saw its own data
    diverged = differing(res[0]["final"], res[1]["final"])
    assert not diverged
    trainable = set(res[0]["final"]) - {"cmvn.mean", "cmvn.istd"}
    updated = set(differing(res[0]["init"], res[0]["final"]))
    assert updated == trainable  # every parameter moved


def test_horovod_cli(tiny_features, tmp_path):
    out = tmp_path / "hvd"
    cfg = tiny_yaml(tmp_path / "tiny.yaml", tiny_features["train"], tiny_features["dev"], out)
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg), "--train.max_steps", "2"), timeout=240)
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["ranks"], summary["engine"], summary["compression"], summary["steps"]) == (2, "horovod", "fp16", 2)
    assert [h["step"] for h in summary["history"]] == [1, 2] and summary["dev"][0]["utterances"] == 4
    state = checkpoint.load(out / "last.pt")
    assert state["position"]["step"] == 2 and state["config"]["dist"]["engine"] == "horovod"
    assert (out / "train.rank0.log").is_file() and (out / "train.rank1.log").is_file()
    assert not list(out.glob(".*.tmp*"))


def test_time_budget_ends_every_rank_at_one_step_with_the_lr_decayed(tiny_features, tmp_path, monkeypatch):
    """train.time_budget_s: 2 Horovod ranks, steps slowed to >= 0.5 s, 1000 epochs allowed. The run
    ends when the ranks' mean share of the budget reaches 1: both ranks log the same step, the
    replicas are identical, the cosine has reached its floor (5 % of the peak) over time, not
    over the 1000 epochs' steps, and the dev set was scored. A relaunch finds the budget spent."""
    out = tmp_path / "budget"
    cfg = tiny_yaml(tmp_path / "b.yaml", tiny_features["train"], tiny_features["dev"], out,
                    train={"epochs": 1000, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "threads": 1,
                           "time_budget_s": 4, "tensorboard": False})
    monkeypatch.setenv("HPC_ASR_TEST_STEP_SLEEP", "0.5")
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg)), timeout=240)
    summary = json.loads((out / "train_summary.json").read_text())
    steps = summary["steps"]
    assert 2 <= steps < 2 * 1000 and summary["replicas_identical"]
    assert summary["train_wall_s"] >= 0.9 * 4
    for r in (0, 1):
        assert f"time budget of 4s spent at step {steps}" in (out / f"train.rank{r}.log").read_text()
    assert [rep["lr"] for rep in summary["replicas"]] == [pytest.approx(1e-3 * 0.05, rel=1e-9)] * 2
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs[1] > lrs[-1] and all(a >= b for a, b in itertools.pairwise(lrs[1:]))  # decays over time
    assert summary["dev"] and summary["dev"][-1]["step"] == steps
    assert f"step {steps} (" in (out / "train.rank0.log").read_text()  # the log shows the budget spent
    again = run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg)), timeout=240)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == steps
    assert "time budget of 4s already spent" in (out / "train.rank0.log").read_text(), again.stderr


def test_torch_engine_cli(tiny_features, tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_yaml(tmp_path / "tiny.yaml", tiny_features["train"], tiny_features["dev"], out)
    proc = run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg), "--train.max_steps", "2",
                          "--dist.engine", "torch"), timeout=240)
    assert "engine torch" in proc.stderr and "device cpu" in proc.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["ranks"], summary["engine"], summary["steps"]) == (2, "torch", 2)
    assert checkpoint.load(out / "last.pt")["position"]["step"] == 2


@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_batchnorm_statistics_are_averaged_so_replicas_and_checkpoint_agree(tiny_features, tmp_path, engine):
    """The demo's BatchNorm conv module keeps running statistics per rank (each rank normalises its
    own batches). At every checkpoint and evaluation they are averaged over the ranks, so the
    replicas end identical and last.pt holds statistics of all ranks' data, not rank 0's."""
    out = tmp_path / engine
    cfg = tiny_yaml(tmp_path / f"{engine}.yaml", tiny_features["train"], tiny_features["dev"], out,
                    model={"conv_norm": "batch"}, train={"epochs": 2, "tensorboard": False})
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg), "--dist.engine", engine), timeout=240)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["engine"] == engine and summary["steps"] >= 2 and len(summary["dev"]) == 2
    assert summary["replicas_identical"], summary["replicas"]
    assert "replicas differ" not in (out / "train.rank0.log").read_text()
    stats = {k: v for k, v in checkpoint.load(out / "last.pt")["model"].items() if "running_" in k}
    assert stats and all(torch.isfinite(v).all() for v in stats.values())


# ---- resume --------------------------------------------------------------------------------

class Preempted(Exception):
    pass


def _resume_config(dirs: dict[str, Path], out: Path, *extra: str):
    # Dropout and SpecAugment stay on: a resumed run must redraw the same masks.
    return config(dirs["train"], dirs["dev"], out, *TINY_MODEL, "--data.max_utts", "2",
                  "--model.dropout", "0.1", "--specaug.enabled", "true", "--train.epochs", "3",
                  "--train.log_every", "1", *extra)


def _count_batches(monkeypatch) -> list[int]:
    """Training batches the loop receives (evaluation batches, which share the collate, are not)."""
    calls = []
    real = train_mod.make_loader

    def counting(*a, **kw):
        for batch in real(*a, **kw):
            calls.append(1)
            yield batch

    monkeypatch.setattr(train_mod, "make_loader", counting)
    return calls


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = checkpoint.load(a / "last.pt"), checkpoint.load(b / "last.pt")
    weights = differing(sa["model"], sb["model"])
    assert not weights
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    moments = [k for k in oa if differing(oa[k], ob[k])]
    assert not moments
    assert sa["position"]["step"] == sb["position"]["step"]
    ha, hb = sa["position"]["history"], sb["position"]["history"]
    assert [(h["step"], h["loss"], h["lr"]) for h in ha] == [(h["step"], h["loss"], h["lr"]) for h in hb]


def test_resume_after_preemption_is_exact(tiny_features, tmp_path, monkeypatch):
    """A job killed after an epoch's checkpoint and relaunched with the same command ends with
    the same weights, optimizer state and loss curve as one that was never interrupted."""
    straight = tmp_path / "straight"
    train_mod.train(_resume_config(tiny_features, straight, "--train.warmup_steps", "2"))  # cosine active

    split = tmp_path / "split"
    real_evaluate, evals = train_mod.evaluate, []

    def preempt_after_epoch_1(*a, **kw):  # evaluate runs right after the epoch-end checkpoint
        evals.append(1)
        if len(evals) == 2:
            raise Preempted
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(train_mod, "evaluate", preempt_after_epoch_1)
    with pytest.raises(Preempted):
        train_mod.train(_resume_config(tiny_features, split, "--train.warmup_steps", "2"))
    assert checkpoint.load(split / "last.pt")["position"]["epoch"] == 2
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)

    batches = _count_batches(monkeypatch)
    summary = train_mod.train(_resume_config(tiny_features, split, "--train.warmup_steps", "2"))
    steps_per_epoch = summary["steps"] // 3
    assert len(batches) == steps_per_epoch  # only the last epoch was trained again
    assert "resumed from" in (split / "train.rank0.log").read_text()
    _assert_same_run(straight, split)


@pytest.mark.parametrize("workers", ["0", "1"])  # in-process, and a DataLoader worker process
def test_resume_mid_epoch_is_exact(tiny_features, tmp_path, monkeypatch, workers):
    """Stopping with train.max_steps in the middle of an epoch, then continuing.

    max_steps also sets the LR schedule's length, so the two halves would follow different
    cosine curves; a warmup longer than the run keeps the LR independent of it and isolates
    what resume itself must restore (batch position, RNG, optimizer and scheduler state)."""
    w = ["--train.warmup_steps", "100", "--data.num_workers", workers]
    straight = tmp_path / "straight"
    a = train_mod.train(_resume_config(tiny_features, straight, *w))
    total = a["steps"]
    assert total % 3 == 0 and total >= 6
    half = total // 2 if (total // 2) % (total // 3) else total // 2 + 1  # not on an epoch boundary

    split = tmp_path / "split"
    first = train_mod.train(_resume_config(tiny_features, split, *w,
                                           "--train.max_steps", str(half)))
    assert first["steps"] == half
    batches = _count_batches(monkeypatch)
    second = train_mod.train(_resume_config(tiny_features, split, *w,
                                            "--train.max_steps", str(total)))
    assert second["steps"] == total
    assert len(batches) == total - half
    _assert_same_run(straight, split)


def test_resume_false_starts_over(tiny_features, tmp_path):
    """The first run goes further (step 3) than the second may (2): a resume would start past the end."""
    out = tmp_path / "run"
    train_mod.train(_resume_config(tiny_features, out, "--train.max_steps", "3"))
    log = out / "train.rank0.log"
    before = log.read_text() if log.is_file() else ""
    s = train_mod.train(_resume_config(tiny_features, out, "--train.max_steps", "2", "--train.resume", "false"))
    assert s["steps"] == 2 and [h["step"] for h in s["history"]] == [1, 2]
    assert "resumed from" not in log.read_text()[len(before):]


# ---- uneven epochs, accum_steps 3, resumes in a later epoch (1 and 2 ranks) -----------------

UNEVEN = {"max_frames": 150, "max_utts": 3, "bucket_size": 5}  # 12 utterances of 30-95 frames


def _uneven_args() -> list[str]:
    return [a for k, v in UNEVEN.items() for a in (f"--data.{k}", str(v))] + ["--train.accum_steps", "3"]


def _epoch_lengths(train_dir: Path, size: int, epochs: int = 3) -> list[int]:
    """Local batches per epoch of the training sampler (seed 0) on ``size`` ranks."""
    s = BucketBatchSampler(FeatureSet(train_dir).num_frames, UNEVEN["max_frames"], UNEVEN["max_utts"], 0, size,
                           seed=0, bucket_size=UNEVEN["bucket_size"])
    out = []
    for e in range(epochs):
        s.set_epoch(e)
        out.append(len(s))
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> dict[str, Path]:
    """12 utterances whose bucketed batch count changes between epochs (11, 10, 10 on one rank;
    6, 5, 5 per rank on two), and an uninterrupted 3-epoch single-process run over them."""
    root = tmp_path_factory.mktemp("uneven")
    dirs = {"train": make_feature_dir(root / "train", 12, TEXTS, seed=0, shards=2),
            "dev": make_feature_dir(root / "dev", 2, TEXTS[4:], seed=1, shards=1), "root": root}
    assert _epoch_lengths(dirs["train"], 1) == [11, 10, 10] and _epoch_lengths(dirs["train"], 2) == [6, 5, 5]
    train_mod.train(_resume_config(dirs, root / "straight", *_uneven_args(), "--train.warmup_steps", "2"))
    return dirs


@pytest.mark.parametrize("where", ["epoch2_start", "epoch2_middle"])
def test_uneven_epochs_with_accumulation_resume_in_epoch2_exactly(uneven, tmp_path, monkeypatch, where):
    """accum_steps 3 over epochs of 11, 10 and 10 batches: every epoch ends with an optimizer step
    (4 + 4 + 4 = 12 steps; no partial group leaks into the next epoch), and a run stopped at the
    start of epoch 2 (after epoch 1's checkpoint) or in its middle (a signal at step 10) and
    relaunched ends bitwise equal to the uninterrupted run: the batch count and the dropout
    masks of epoch 2 do not depend on which epochs this process has seen."""
    straight, split = uneven["root"] / "straight", tmp_path / "split"
    args = [*_uneven_args(), "--train.warmup_steps", "2"]
    if where == "epoch2_start":
        real_evaluate, evals = train_mod.evaluate, []

        def preempt_after_epoch_1(*a, **kw):  # evaluate runs right after the epoch-end checkpoint
            evals.append(1)
            if len(evals) == 2:
                raise Preempted
            return real_evaluate(*a, **kw)

        monkeypatch.setattr(train_mod, "evaluate", preempt_after_epoch_1)
        with pytest.raises(Preempted):
            train_mod.train(_resume_config(uneven, split, *args))
        monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
        assert checkpoint.load(split / "last.pt")["position"]["epoch"] == 2
    else:
        monkeypatch.setenv("HPC_ASR_TEST_WAIT_SIGNAL", "10:0")

        def send_when_waiting():
            deadline = time.time() + 120
            while not (split / "waiting.rank0").is_file() and time.time() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=send_when_waiting, daemon=True).start()
        with pytest.raises(train_mod.Preempted):
            train_mod.train(_resume_config(uneven, split, *args))
        monkeypatch.delenv("HPC_ASR_TEST_WAIT_SIGNAL")
        pos = checkpoint.load(split / "last.pt")["position"]
        assert (pos["epoch"], pos["step"]) == (2, 10) and 0 < pos["batch"] < 10
    summary = train_mod.train(_resume_config(uneven, split, *args))
    assert "resumed from" in (split / "train.rank0.log").read_text()
    _assert_same_run(straight, split)
    assert summary["steps"] == sum(-(-n // 3) for n in _epoch_lengths(uneven["train"], 1)) == 12


def test_two_ranks_uneven_epochs_accumulation_signal_in_epoch2_resumes_exactly(uneven, tmp_path):
    """The same under 2-rank Horovod (6, 5, 5 local batches per epoch, accum_steps 3: 2 steps per
    epoch): SIGUSR1 to rank 1 at step 5 (epoch 2, mid-epoch), relaunch, bitwise equal to the
    uninterrupted 2-rank run, replicas identical."""
    def yaml_for(out: Path) -> Path:
        return tiny_yaml(tmp_path / f"{out.name}.yaml", uneven["train"], uneven["dev"], out, data=UNEVEN,
                         train={"epochs": 3, "warmup_steps": 2, "accum_steps": 3, "tensorboard": False},
                         model={"dropout": 0.1}, specaug={"enabled": True})

    straight, split = tmp_path / "straight", tmp_path / "split"
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(yaml_for(straight))), timeout=300)
    proc = _launch(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(yaml_for(split))),
                   HPC_ASR_TEST_WAIT_SIGNAL="5:1")
    os.kill(int(wait_file(split / "waiting.rank1", proc)), signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == train_mod.EXIT_PREEMPTED, err
    pos = checkpoint.load(split / "last.pt")["position"]
    assert (pos["epoch"], pos["step"], pos["batch"]) == (2, 5, 3)
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(yaml_for(split))), timeout=300)
    _assert_same_run(straight, split)
    summary = json.loads((split / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["replicas_identical"], summary["replicas"]


# ---- preemption: a signal to one rank --------------------------------------------------------

def _launch(cmd: list[str], **env: str):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**run_env(), **env}, cwd=ROOT)




def _hvd_yaml(tmp_path: Path, tiny_features, out: Path, **train) -> Path:
    """3 epochs of 2 steps on 2 ranks, dropout and SpecAugment on (a resume must redraw them)."""
    return tiny_yaml(tmp_path / f"{out.name}.yaml", tiny_features["train"], tiny_features["dev"], out,
                     train={"epochs": 3, "warmup_steps": 2, "tensorboard": False, **train},
                     model={"dropout": 0.1}, specaug={"enabled": True})


@pytest.fixture(scope="module")
def preempted(tiny_features, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 2-rank run, and a copy of the same run that got SIGUSR1 (sent from
    outside, by pid) on rank 1 only while it was about to agree on step 3 (mid-epoch)."""
    root = tmp_path_factory.mktemp("preempt")
    straight, split = root / "straight", root / "split"
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(_hvd_yaml(root, tiny_features, straight))),
        timeout=240)
    proc = _launch(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(_hvd_yaml(root, tiny_features, split))),
                   HPC_ASR_TEST_WAIT_SIGNAL="3:1")  # rank 1 pauses before the step-3 agreement
    os.kill(int(wait_file(split / "waiting.rank1", proc)), signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == train_mod.EXIT_PREEMPTED, err  # mpirun passes the ranks' status 3 on
    shutil.copytree(split, root / "split_copy")
    return {"root": root, "straight": straight, "split": split, "copy": root / "split_copy"}


def test_sigusr1_to_one_rank_checkpoints_exits_3_and_resumes_exactly(preempted, tiny_features):
    """Both ranks agreed at step 3, rank 0 wrote last.pt there, both exited 3; relaunching the same
    command ends bitwise equal to the uninterrupted run."""
    split = preempted["split"]
    assert checkpoint.load(split / "last.pt")["position"]["step"] == 3
    for r in (0, 1):
        assert "preempted (signal) at step 3" in (split / f"train.rank{r}.log").read_text()
    assert not (split / "train_summary.json").exists()
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(_hvd_yaml(preempted["root"], tiny_features, split))),
        timeout=240)
    assert "resumed from" in (split / "train.rank0.log").read_text()
    _assert_same_run(preempted["straight"], split)


def test_resume_on_fewer_ranks_keeps_the_lr_schedule(preempted, tiny_features):
    """Preempted on 2 ranks at step 3 of 6, resumed on 1 rank: each 1-rank step is half a global
    batch, so the schedule advances by 0.5 per step and the lr continues the 2-rank curve."""
    out = preempted["copy"]
    cfg = load_config(_hvd_yaml(preempted["root"], tiny_features, out), ["--dist.engine", "none"])
    one = train_mod.train(cfg)
    straight = json.loads((preempted["straight"] / "train_summary.json").read_text())
    lr2 = {h["step"]: h["lr"] for h in straight["history"]}
    lr1 = [h["lr"] for h in one["history"] if h["step"] > 3]
    assert len(lr1) == 6  # 2 half-size steps left in epoch 1, 4 in epoch 2
    assert lr1[0] == lr2[4] and lr1[2] == lr2[5] and lr1[4] == lr2[6]  # same schedule point, same lr
    assert lr2[4] > lr1[1] > lr2[5] > lr1[3] > lr2[6] > lr1[5]  # in between: no jump, still decaying
    assert checkpoint.load(out / "last.pt")["position"]["sched_step"] == 6.0
    assert "config changed since the checkpoint: dist.engine" in (out / "train.rank0.log").read_text()


@pytest.mark.slow  # ~40 s: a 1-rank run, its 2-rank resume and a reference run
def test_resume_on_more_ranks_keeps_the_lr_schedule(tiny_features, tmp_path):
    """1 rank stopped at step 3 of its 4-batch epoch, resumed on 2 Horovod ranks: the old world's
    batches are skipped (3 global batches → 2 local ones each, rounded up), every 2-rank step is
    two schedule steps, and the lr continues the 1-rank curve (warmup longer than the run keeps it
    independent of max_steps)."""
    warm = {"warmup_steps": 100}
    straight = train_mod.train(load_config(_hvd_yaml(tmp_path, tiny_features, tmp_path / "one", **warm),
                                           ["--dist.engine", "none"]))
    lr1 = {h["step"]: h["lr"] for h in straight["history"]}
    out = tmp_path / "grown"
    cfg = _hvd_yaml(tmp_path, tiny_features, out, **warm)
    # the 1-rank part in its own process: an in-process run keeps train.lock until the process exits
    run([sys.executable, "-m", "hpc_asr", "train", "--config", str(cfg), "--dist.engine", "none",
         "--train.max_steps", "3"], timeout=240)
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg)), timeout=240)
    two = json.loads((out / "train_summary.json").read_text())
    assert two["ranks"] == 2 and two["replicas_identical"], two["replicas"]
    assert "resumed from" in (out / "train.rank0.log").read_text()
    steps = [h["step"] for h in two["history"]]
    assert steps == list(range(1, 8))  # 3 on 1 rank, then the rest of epoch 0 (skipped) and 2 + 2
    lr2 = {h["step"]: h["lr"] for h in two["history"]}
    assert [lr2[s] for s in (4, 5, 6, 7)] == [lr1[4], lr1[6], lr1[8], lr1[10]]  # schedule steps 3, 5, 7, 9
    assert checkpoint.load(out / "last.pt")["position"]["sched_step"] == 11.0


def test_sigterm_in_process_checkpoints_and_raises(tiny_features, tmp_path, monkeypatch):
    """SIGTERM (what SLURM sends first) during a single-process run: Preempted after last.pt."""
    out = tmp_path / "one"
    monkeypatch.setenv("HPC_ASR_TEST_WAIT_SIGNAL", "2:0")

    def send_when_waiting():  # only once the handler is installed and the run waits at step 2
        deadline = time.time() + 60
        while not (out / "waiting.rank0").is_file() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_waiting, daemon=True).start()
    with pytest.raises(train_mod.Preempted):
        train_mod.train(_resume_config(tiny_features, out))
    assert checkpoint.load(out / "last.pt")["position"]["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


# ---- GradScaler and lr after a Horovod resume; NaN/Inf skipping; another world size ---------

def test_horovod_resume_gives_every_rank_rank0s_scaler_and_lr(tiny_features, tmp_path):
    """fp16 autocast + GradScaler (real on CPU in torch 2.x) under 2-rank Horovod: after a resume
    with a changed --train.lr every rank holds rank 0's scaler state and the same lr, and the
    replicas end bitwise identical."""
    out = tmp_path / "amp"
    cfg = _hvd_yaml(tmp_path, tiny_features, out, precision="fp16")
    train_mod.train(load_config(cfg, ["--train.max_steps", "2", "--dist.engine", "none"]))  # a checkpoint
    state = checkpoint.load(out / "last.pt")
    assert state["scaler"]["scale"] > 0
    state["scaler"].update(scale=512.0, _growth_tracker=7)  # a state no fresh GradScaler has
    checkpoint.save(out / "last.pt", state)

    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg), "--train.max_steps", "4",
                   "--train.lr", "3e-3"), timeout=240)
    logs = [(out / f"train.rank{r}.log").read_text().splitlines() for r in (0, 1)]
    resumed = [[ln.split(") ", 1)[1] for ln in lg if ") lr " in ln][-1] for lg in logs]
    assert resumed[0] == resumed[1], resumed
    assert "'scale': 512.0" in resumed[1] and "'_growth_tracker': 7" in resumed[1]
    step_lrs = [[ln.split(" lr ")[1].split()[0] for ln in lg if " step 4/" in ln] for lg in logs]
    assert step_lrs[0] == step_lrs[1] and step_lrs[0]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["replicas_identical"], summary["replicas"]
    assert [r["scaler"]["scale"] for r in summary["replicas"]] == [512.0, 512.0]  # 2 steps < growth interval
    assert "train.lr 0.001 -> 0.003" in logs[0][-20:].__str__()


def test_nonfinite_gradient_step_is_skipped_on_every_rank(tiny_features, tmp_path):
    """A real inf in rank 1's loss at step 2: the averaged gradient is non-finite on both ranks,
    both skip the step and count it, and the weights stay finite and equal."""
    out = tmp_path / "inf"
    proc = _launch(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(_hvd_yaml(tmp_path, tiny_features, out)),
                              "--train.max_steps", "3"), HPC_ASR_TEST_INF_STEP="2:1")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1
    assert [h["skipped_steps"] for h in summary["history"]] == [0, 1, 1]
    assert summary["replicas_identical"] and all(r["finite"] for r in summary["replicas"])
    for r in (0, 1):
        assert "step 2: non-finite gradient norm, step skipped" in (out / f"train.rank{r}.log").read_text()
    state = checkpoint.load(out / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # The skipped step never reached AdamW: 2 real steps (the zero-lr step Horovod's
    # broadcast_optimizer_state takes to create the state at start is undone: engines.py).
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}


# ---- lengths scanned up front; lr scaling; metrics ------------------------------------------

def _feature_dir_lengths(path: Path, lengths: list[int], text: str = "yes") -> Path:
    """A prepared directory (through the real ShardWriter/write_index) with given frame counts."""
    from hpc_asr.config import FeatureConfig
    from hpc_asr.data.shards import ShardWriter, write_index

    path.mkdir(parents=True)
    feats_cfg = FeatureConfig()
    rng = np.random.default_rng(0)
    w = ShardWriter(path / "shard-00000.h5", feats_cfg, {"rank": 0, "size": 1})
    total, total_sq, count = np.zeros(80), np.zeros(80), 0
    for i, n in enumerate(lengths):
        f = rng.standard_normal((n, 80)).astype(np.float32)
        w.add(f"len{n}_{i}", f, text, "spk", n / 100)
        total, total_sq, count = total + f.sum(0), total_sq + (f.astype(np.float64) ** 2).sum(0), count + n
    write_index(path, feats_cfg, [w.close()], (total, total_sq, count))
    return path


def test_too_long_dev_utterance_fails_before_training(tiny_features, tmp_path):
    dev = _feature_dir_lengths(tmp_path / "dev", [40, 2500, 60])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"utterance len2500_1 has 2500 frames > data\.max_frames=2000"):
        train_mod.train(config(tiny_features["train"], dev, out, *TINY_MODEL, "--data.max_frames", "2000"))
    assert not (out / "last.pt").exists()  # found before step 0, not after an epoch
    proc = run([sys.executable, "-m", "hpc_asr", "train", "--dist.engine", "none", "--data.train",
                str(tiny_features["train"]), "--data.dev", str(dev), "--train.out_dir", str(out),
                "--data.max_frames", "2000"], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "len2500_1" in proc.stderr and "data.max_frames" in proc.stderr and str(dev) in proc.stderr


def test_utterances_shorter_than_the_front_end_are_skipped(tmp_path):
    """5 frames leave nothing after two stride-2 kernel-3 convolutions: such utterances are
    dropped (and counted) from train and dev instead of crashing the convolution."""
    train = _feature_dir_lengths(tmp_path / "train", [5, 40, 6, 50])
    dev = _feature_dir_lengths(tmp_path / "dev", [4, 45])
    out = tmp_path / "run"
    s = train_mod.train(config(train, dev, out, *TINY_MODEL, "--data.max_utts", "1", "--train.epochs", "1"))
    assert s["steps"] == 2 and s["dev"][0]["utterances"] == 1
    log = (out / "train.rank0.log").read_text()
    assert f"{train}: 2 utterances shorter than the subsampling receptive field skipped" in log
    assert f"{dev}: 1 utterances shorter than the subsampling receptive field skipped" in log


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rule(tiny_features, tmp_path, rule, factor):
    """Global batch = max_frames x accum_steps x ranks = 2000 x 2 x 1 = 4x the reference 1000."""
    assert schedule.lr_scale(rule, 4000, 1000) == factor
    out = tmp_path / rule
    s = train_mod.train(config(tiny_features["train"], tiny_features["dev"], out, *TINY_MODEL,
                               "--data.max_frames", "2000", "--train.accum_steps", "2", "--train.max_steps", "1",
                               "--train.lr", "1e-3", "--train.warmup_steps", "4", "--train.log_every", "1",
                               "--train.lr_scaling", rule, "--train.ref_batch_frames", "1000"))
    assert s["history"][0]["lr"] == pytest.approx(1e-3 * factor * schedule.lr_lambda(0, 4, 1), rel=1e-12)
    assert f"peak lr {1e-3 * factor:.3e} (lr_scaling {rule})" in (out / "train.rank0.log").read_text()


def test_metrics_jsonl_and_tensorboard(tiny_features, tmp_path):
    out = tmp_path / "run"
    s = train_mod.train(_resume_config(tiny_features, out, "--train.max_steps", "2", "--train.tensorboard", "true"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert next(r for r in rows if r["kind"] == "dev")["wer"] == s["dev"][0]["wer"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert "dev/wer" in acc.Tags()["scalars"]


def test_progress_bar_only_on_a_terminal(tiny_features, tmp_path):
    import pty

    args = [sys.executable, "-m", "hpc_asr", "train", "--dist.engine", "none", "--data.train",
            str(tiny_features["train"]),
            "--data.dev", str(tiny_features["dev"]), *TINY_MODEL, "--train.max_steps", "2", "--train.threads", "1",
            "--train.tensorboard", "false"]
    piped = run([*args, "--train.out_dir", str(tmp_path / "piped")])
    assert "\r" not in piped.stderr and "steps/s" not in piped.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*args, "--train.out_dir", str(tmp_path / "tty")], stderr=follower,
                            stdout=subprocess.DEVNULL, env=run_env(), cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    tty = b"".join(chunks).decode()
    assert "\r[train] epoch 1 step 2/2 loss" in tty and "steps/s" in tty


# ---- presets ------------------------------------------------------------------------------

PRESETS = {  # name: (min, max) parameters, as documented in the file header and the README
    "demo": (1.9e6, 2.2e6), "small": (12e6, 14e6), "medium": (29e6, 31e6), "seed": (103e6, 106e6),
    "librispeech100": (103e6, 106e6),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_documented_size_and_flops(name):
    """Every preset's header states its size (and, where it builds its own model, its FLOPs)."""
    import re

    from hpc_asr.model import ConformerCTC

    path = ROOT / "hpc_asr" / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    header = path.read_text()
    m = re.search(r"~([\d.]+) M parameters", header)
    assert m, f"{path.name}: the header does not state '~N M parameters'"
    stated = float(m.group(1)) * 1e6
    lo, hi = PRESETS[name]
    if name == "librispeech100":  # the recipe trains the seed model: no need to build it twice
        assert cfg.model == load_config(path.with_name("seed.yaml")).model
        assert lo <= stated <= hi, f"{name}: header says {m.group(0)}"
        return
    cfg.model.vocab_size = 29 if cfg.train.tokenizer == "char" else cfg.train.bpe_vocab_size + 1
    params = ConformerCTC(cfg.model, cfg.features.num_mel_bins).num_params()
    assert lo <= params <= hi, f"{name}: {params / 1e6:.2f}M"
    assert params == pytest.approx(stated, rel=0.05), f"{name}: header says {m.group(0)}, model has {params}"
    flops = schedule.flops_per_audio_second(cfg.model, cfg.features.num_mel_bins)
    m = re.search(r"~([\d.]+) GFLOPs forward per audio second", header)
    assert m, f"{path.name}: the header does not state '~X GFLOPs forward per audio second'"
    assert flops / 1e9 == pytest.approx(float(m.group(1)), rel=0.02), f"{name}: {flops / 1e9:.3f} GFLOPs"
    if name == "seed":
        assert (cfg.model.n_layers, cfg.model.d_model) == (16, 512)


def test_flops_counter_counts_a_known_layer():
    """A 1-layer check of the counter itself: the CTC head alone is 2 * T' * D * V FLOPs."""
    from hpc_asr.config import ModelConfig

    small = ModelConfig(d_model=32, n_heads=2, n_layers=1, ff_mult=2, conv_kernel=5, subsample_channels=8,
                        vocab_size=29)
    big = ModelConfig(**{**vars(small), "vocab_size": 129})
    t_out = 24  # 100 frames -> ((100 - 1) // 2 - 1) // 2
    diff = schedule.flops_per_audio_second(big) - schedule.flops_per_audio_second(small)
    assert diff == 2 * t_out * 32 * 100


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tiny_features, tmp_path, precision):
    """bf16 autocast without a scaler; fp16 autocast with a real GradScaler (both run on CPU)."""
    out = tmp_path / precision
    seen: set = set()  # (module type, output dtype) of every forward with autograd on: the train steps

    def record(module, args, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            seen.add((type(module).__name__, output.dtype))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        s = train_mod.train(_resume_config(tiny_features, out, "--train.max_steps", "2", "--train.precision",
                                           precision))
    finally:
        hook.remove()
    assert s["steps"] == 2 and all(r["finite"] for r in s["replicas"])
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert {dtype for name, dtype in seen if name == "Linear"} == {want}, seen  # the step ran under autocast
    scaler = checkpoint.load(out / "last.pt")["scaler"]
    if precision == "fp16":  # early overflows are skipped steps, and each halves the scale
        assert scaler["scale"] == 65536.0 * 0.5 ** s["skipped_steps"]
    else:
        assert scaler == {} and s["skipped_steps"] == 0
    assert load_config(None, ["--train.precision", precision]).train.autocast_dtype("cpu") == want


# ---- a checkpoint that cannot continue this run ---------------------------------------------

def test_resume_with_another_model_is_one_line_naming_the_keys(tiny_features, tmp_path):
    out = tmp_path / "run"
    train_mod.train(_resume_config(tiny_features, out, "--train.max_steps", "1"))
    with pytest.raises(train_mod.ResumeError, match=r"model\.d_model 32 -> 48; model\.n_layers 1 -> 2"):
        train_mod.train(_resume_config(tiny_features, out, "--model.d_model", "48", "--model.n_layers", "2"))
    proc = run([sys.executable, "-m", "hpc_asr", "train", "--dist.engine", "none", "--data.train",
                str(tiny_features["train"]), "--data.dev", str(tiny_features["dev"]), "--train.out_dir", str(out),
                *TINY_MODEL, "--model.conv_kernel", "7"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {out / 'last.pt'}: checkpoint was trained with a different model/features: "
        "model.conv_kernel 5 -> 7"]


def test_failed_strict_load_on_rank0_ends_every_rank(tiny_features, tmp_path):
    """Rank 0 cannot load last.pt (a tensor is missing): it tells the others through the resume
    broadcast, so both ranks exit 2 with the message instead of rank 1 waiting forever."""
    out = tmp_path / "hvd"
    cfg = tiny_yaml(tmp_path / "t.yaml", tiny_features["train"], tiny_features["dev"], out,
                    train={"tensorboard": False})
    train_mod.train(load_config(cfg, ["--train.max_steps", "1", "--dist.engine", "none"]))  # a checkpoint
    state = checkpoint.load(out / "last.pt")
    del state["model"]["ctc.weight"]
    checkpoint.save(out / "last.pt", state)
    proc = run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg), "--train.max_steps", "2"),
               timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    # One per rank, the same (mpirun may forward the two ranks' lines without a newline between).
    errors = [part.split("\n")[0].strip() for part in proc.stderr.split("error: ")[1:]]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr
    assert "strict load failed" in errors[0] and "ctc.weight" in errors[0]
    assert "Traceback" not in proc.stderr


# ---- Horovod elastic ---------------------------------------------------------------------------

def _train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _wait_record(out: Path, proc, ok, what: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [r for r in _train_records(out) if ok(r)]
        if found:
            return found[0]
        if proc.poll() is not None:
            out_s, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before {what}\n{out_s[-3000:]}\n{err[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no train record with {what} in {timeout} s")


@pytest.mark.slow
def test_elastic_train_2_to_1_to_2(tiny_features, tmp_path):
    """The real train command under ``horovodrun --min-np 1 --max-np 2 --host-discovery-script``:
    the test shrinks the hosts to one slot mid-run and grows them back. Training finishes every
    epoch with each global batch consumed exactly once, the schedule at its end, no step lost or
    repeated, and both final replicas (one of them a rank that joined) bitwise identical."""
    out, hosts, discover = tmp_path / "run", tmp_path / "hosts", tmp_path / "discover.sh"
    hosts.write_text("localhost:2\n")
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    cfg = tiny_yaml(tmp_path / "e.yaml", tiny_features["train"], tiny_features["dev"], out,
                    train={"epochs": 6, "warmup_steps": 2, "ckpt_every_steps": 2, "weight_decay": 0.01,
                           "tensorboard": False, "log_every": 1, "threads": 1,
                           "resume": False},  # the rank that joins starts with an empty optimizer
                    dist={"engine": "auto", "compression": "fp16", "elastic": True})
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    proc = _launch([horovodrun, "-np", "2", "--min-np", "1", "--max-np", "2", "--network-interface", "lo",
                    "--host-discovery-script", str(discover), sys.executable, "-m", "hpc_asr", "train",
                    "--config", str(cfg)], HPC_ASR_TEST_STEP_SLEEP="0.4")
    try:
        _wait_record(out, proc, lambda r: r["step"] >= 2, "step 2")
        hosts.write_text("localhost:1\n")
        shrunk = _wait_record(out, proc, lambda r: r["ranks"] == 1, "1 rank")
        _wait_record(out, proc, lambda r: r["step"] >= shrunk["step"] + 2, "2 steps on 1 rank")
        hosts.write_text("localhost:2\n")
        _, err = proc.communicate(timeout=170)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    ranks = [h["ranks"] for h in summary["history"]]
    assert ranks[0] == 2 and 1 in ranks and ranks[-1] == 2, ranks  # 2 → 1 → 2
    first1, last1 = ranks.index(1), len(ranks) - 1 - ranks[::-1].index(1)
    assert set(ranks[first1 : last1 + 1]) == {1}, ranks
    assert [h["step"] for h in summary["history"]] == list(range(1, summary["steps"] + 1))  # none lost/repeated
    batches = 6 * 4  # 6 epochs x 8 utterances / max_utts 2: each step consumes one batch per rank
    assert sum(ranks) == batches, ranks
    pos = checkpoint.load(out / "last.pt")["position"]
    assert pos["epoch"] == 6 and pos["sched_step"] == batches / 2  # schedule unit: the first run's 2 ranks
    assert summary["ranks"] == 2 and summary["replicas_identical"], summary["replicas"]
    assert len({r["weights_sha256"] for r in summary["replicas"]}) == 1
    assert "elastic: 1 ranks" in (out / "train.rank0.log").read_text()


def test_elastic_needs_an_elastic_launcher(tiny_features, tmp_path):
    """dist.elastic under plain mpirun: one line saying how to launch it, no traceback."""
    cfg = tiny_yaml(tmp_path / "e.yaml", tiny_features["train"], tiny_features["dev"], tmp_path / "run",
                    dist={"engine": "auto", "elastic": True})
    proc = run([sys.executable, "-m", "hpc_asr", "train", "--config", str(cfg)], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "dist.elastic is true but this process was not started by an elastic horovodrun" in proc.stderr
    bad = run([sys.executable, "-m", "hpc_asr", "train", "--config", str(cfg), "--dist.engine", "torch"], check=False)
    assert bad.returncode != 0 and "dist.elastic needs dist.engine horovod" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bpe_tokenizer_of_the_checkpoint_reaches_every_rank_on_resume(tiny_features, tmp_path):
    """issue 19: on resume rank 0 takes the BPE model from last.pt and broadcasts it; a rank that
    trained its own would encode the transcripts differently. The checkpoint's tokenizer is
    replaced by one trained on other text (same size), so only a real broadcast gives every rank
    the checkpoint's pieces."""
    from hpc_asr.data.tokenizer import train_bpe
    from hpc_asr.train.setup import tokenizer_sha256

    out = tmp_path / "bpe"
    cfg = _hvd_yaml(tmp_path, tiny_features, out, tokenizer="bpe", bpe_vocab_size=40, max_steps=2)
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg)), timeout=240)
    state = checkpoint.load(out / "last.pt")
    other = train_bpe(["zebra quartz jumps over vexing wolves"] * 50 + ["the quick brown fox"] * 50, 40)
    assert other.vocab_size == 41 and tokenizer_sha256(other) != state["tokenizer"].get("sha", "")
    state["tokenizer"] = other.state_dict()
    checkpoint.save(out / "last.pt", state)
    run(mpirun_cmd(2, "-m", "hpc_asr", "train", "--config", str(cfg), "--train.max_steps", "3"), timeout=240)
    want = tokenizer_sha256(other)[:16]
    for r in (0, 1):
        lines = [ln for ln in (out / f"train.rank{r}.log").read_text().splitlines() if "tokenizer bpe sha256" in ln]
        assert len(lines) == 2 and lines[-1].endswith(want), (r, lines, want)
