"""A training run's set-up: the engine, the data (scanned up front on every rank), the tokenizer,
the model, the wrapped optimizer; and the resume from ``last.pt`` that makes every rank start from
rank 0's state. ``Run`` holds what the loop needs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpc_asr import checkpoint
from hpc_asr.config import Config
from hpc_asr.data import tokenizer as tokenizers
from hpc_asr.data.loader import BucketBatchSampler, FeatureSet, SubsetView, check_lengths, usable_subset
from hpc_asr.dist.engines import Engine, make_engine
from hpc_asr.dist.launch import compute_threads, log0
from hpc_asr.model import ConformerCTC
from hpc_asr.train.lock import hold as hold_out_dir
from hpc_asr.train.log import MetricsWriter, Progress
from hpc_asr.train.preempt import SignalFlag
from hpc_asr.train.schedule import schedule, set_lr
from hpc_asr.train.state import ResumeError, new_position, restore

__all__ = ["Run", "make_sampler", "resume", "setup", "tokenizer_sha256"]


@dataclass
class Run:
    cfg: Config
    engine: Engine
    tok: Any
    train_set: FeatureSet
    dev_set: Any
    keep: np.ndarray  # training utterances long enough for the front end
    model: ConformerCTC
    ddp: nn.Module
    optimizer: Any
    scaler: Any
    sampler: BucketBatchSampler
    log: Callable[[str], None]
    metrics: MetricsWriter
    out: Path
    peak_lr: float = 0.0
    total_steps: int = 0
    pos: dict = field(default_factory=dict)
    win: dict = field(default_factory=dict)
    flag: SignalFlag | None = None
    progress: Progress | None = None
    ctc: nn.Module | None = None
    sched_inc: float = 1.0  # schedule steps per optimizer step (global batch / the first run's)
    steps_per_epoch: int = 0
    t_start: float = 0.0
    wall0: float = 0.0
    time_progress: float = 0.0  # ranks' mean training wall time / train.time_budget_s, agreed each step
    commit: Callable[[], None] = lambda: None  # Horovod elastic: state.commit() at checkpoint boundaries
    lock: Any = None  # rank 0's hold on out_dir (hpc_asr.train.lock), released when train() ends

    @property
    def world(self):
        return self.engine.world

    def wall(self) -> float:
        return self.wall0 + time.time() - self.t_start


# ---- set-up ------------------------------------------------------------------------------

def _open_log(out: Path, world) -> Callable[[str], None]:
    log_file = open(out / f"train.rank{world.rank}.log", "a", buffering=1)

    def log(msg: str) -> None:
        log_file.write(f"{time.strftime('%H:%M:%S')} {world.tag} {msg}\n")
        log0(world, f"{erase}[train] {msg}")

    erase = "\r\x1b[K" if sys.stderr.isatty() else ""  # over a progress line, if one is shown

    log.close = log_file.close  # type: ignore[attr-defined]
    log.file_only = lambda msg: log_file.write(f"{time.strftime('%H:%M:%S')} {world.tag} {msg}\n")  # type: ignore
    return log


def _load_data(cfg: Config, engine: Engine, log) -> tuple[FeatureSet, Any, np.ndarray]:
    """Both splits scanned up front on every rank: too long → error, too short → dropped."""
    train_set, dev_set = FeatureSet(cfg.data.train), FeatureSet(cfg.data.dev)
    if train_set.features != cfg.features:
        raise ValueError(f"{cfg.data.train}: features differ from the config's "
                         f"({train_set.features.differences(cfg.features)}; the data's value first)")
    check_lengths(train_set, cfg.data.train, cfg.data.max_frames)
    check_lengths(dev_set, cfg.data.dev, cfg.data.max_frames)
    keep, dropped = usable_subset(train_set.num_frames, cfg.model)
    if dropped:
        log(f"{cfg.data.train}: {dropped} utterances shorter than the subsampling receptive field skipped")
    dev_keep, dev_dropped = usable_subset(dev_set.num_frames, cfg.model)
    if dev_dropped:
        log(f"{cfg.data.dev}: {dev_dropped} utterances shorter than the subsampling receptive field skipped")
        dev_set = SubsetView(dev_set, dev_keep)
    return train_set, dev_set, keep


def _build_optimizer(cfg: Config, model: nn.Module, device: torch.device):
    kw = {"fused": True} if device.type == "cuda" else {}  # one kernel for all params on GPUs
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **kw)


def setup(cfg: Config) -> Run:
    engine = make_engine(cfg.dist)  # dist: init + pin device; Horovod knobs set before hvd.init()
    world, device = engine.world, engine.device
    torch.set_num_threads(compute_threads(cfg.train.threads, engine))  # dist: collective (affinity per host)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = _open_log(out, world)
    lock = hold_out_dir(out, engine, log, collective=not cfg.dist.elastic)  # dist: one run per out_dir, all ranks agree
    try:
        train_set, dev_set, keep = _load_data(cfg, engine, log)
        tok = _make_tokenizer(cfg, train_set, engine, out)
        log.file_only(f"tokenizer {cfg.train.tokenizer} sha256 {tokenizer_sha256(tok)[:16]}")  # per-rank log only
        cfg.model.vocab_size = tok.vocab_size
        torch.manual_seed(cfg.train.seed)  # same init everywhere; broadcast below makes it exact
        model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
        model.set_cmvn(train_set.cmvn_mean, train_set.cmvn_std)
        model.to(device)
        sampler = make_sampler(cfg, train_set, keep, world)
        ddp = engine.wrap_model(model)  # dist: DDP for the torch engine, unchanged for Horovod
        if cfg.train.compile:
            ddp = torch.compile(ddp)
        optimizer = engine.wrap_optimizer(_build_optimizer(cfg, model, device), model,
                                          cfg.train.accum_steps)  # dist: allreduce hooks
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.autocast_dtype(device.type) == torch.float16)
        metrics = MetricsWriter(out, enabled=world.is_main, tensorboard=cfg.train.tensorboard)
        return Run(cfg, engine, tok, train_set, dev_set, keep, model, ddp, optimizer, scaler, sampler, log,
                    metrics, out, pos=new_position(world.size, cfg.train.accum_steps), lock=lock)
    except BaseException:  # refused data or config: the out_dir is free again at once, not at process exit
        if lock is not None:
            lock.release()
        log.close()
        raise


def tokenizer_sha256(tok) -> str:
    """A fingerprint of a tokenizer's state: ranks (and a resume) that encode alike share it."""
    return hashlib.sha256(json.dumps(tok.json_state(), sort_keys=True).encode()).hexdigest()


def make_sampler(cfg: Config, train_set: FeatureSet, keep: np.ndarray, world) -> BucketBatchSampler:
    return BucketBatchSampler(train_set.num_frames[keep], cfg.data.max_frames, cfg.data.max_utts,
                              world.rank, world.size, shuffle=True, seed=cfg.train.seed,
                              bucket_size=cfg.data.bucket_size)  # dist: each rank its own batches


def _make_tokenizer(cfg: Config, train_set: FeatureSet, engine: Engine, out: Path):
    """Characters, or a BPE model trained on rank 0 from the training transcripts (or taken from
    last.pt when resuming) and broadcast, so every rank encodes identically. Under Horovod elastic
    every rank builds it itself (no collective before the elastic loop: a joining rank would wait
    alone); the elastic state carries rank 0's hash and a differing rank stops with an error."""
    if cfg.train.tokenizer == "char":
        return tokenizers.CharTokenizer()
    state = None
    if engine.world.is_main or cfg.dist.elastic:
        last = out / "last.pt"
        if cfg.train.resume and last.is_file():
            with contextlib.suppress(checkpoint.CheckpointError, KeyError):
                state = checkpoint.load(last)["tokenizer"]
        if state is None or state.get("type") != "bpe":
            state = tokenizers.train_bpe(train_set.texts, cfg.train.bpe_vocab_size).state_dict()
    if not cfg.dist.elastic:
        state = engine.broadcast_object(state)  # dist
    return tokenizers.from_state_dict(state)


# ---- resume ------------------------------------------------------------------------------

def resume(run: Run) -> None:
    """Rank 0 restores, then one broadcast carries the position, the GradScaler state and an
    error (if any): a failed load on rank 0 ends every rank with its message instead of leaving
    them blocked in the next collective. Under Horovod elastic every rank reads the checkpoint
    itself (no collective yet) and the elastic state's first sync makes them agree."""
    last = run.out / "last.pt"
    elastic = run.cfg.dist.elastic
    msg: dict[str, Any] = {"error": None, "pos": run.pos, "changed": [], "resumed": False}
    if run.cfg.train.resume and last.is_file() and (run.world.is_main or elastic):
        try:
            msg["pos"], msg["changed"] = restore(run, last)
            msg["resumed"] = True
        except (checkpoint.CheckpointError, ResumeError, KeyError) as e:
            msg["error"] = f"{last}: {e}"
    msg["scaler"] = run.scaler.state_dict()
    if not elastic:
        msg = run.engine.broadcast_object(msg)  # dist: position, scaler, error flag
    if msg["error"]:
        raise ResumeError(msg["error"])
    run.pos = msg["pos"]
    run.scaler.load_state_dict(msg["scaler"])
    # Horovod's broadcast_optimizer_state takes a dummy step on ranks that hold no optimizer state
    # (all ranks at a fresh start, ranks > 0 on resume): at lr 0 AdamW's weight decay leaves their
    # weights alone; the scheduled lr is set right after.
    for g in run.optimizer.param_groups:
        g["lr"] = 0.0
    if not elastic:
        run.engine.broadcast_state(run.model, run.optimizer)  # dist: everyone starts from rank 0's state
    run.peak_lr, run.total_steps = schedule(run)
    set_lr(run)
    if msg["resumed"]:
        p = run.pos
        run.log(f"resumed from {last}: epoch {p['epoch']} batch {p['batch']} step {p['step']} "
                f"(schedule step {p['sched_step']:g})")
        for c in msg["changed"]:
            run.log(f"config changed since the checkpoint: {c}")
        run.log(f"lr {run.optimizer.param_groups[0]['lr']:.6e} scaler {run.scaler.state_dict()}")  # the restored state
