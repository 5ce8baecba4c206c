"""The training loop: set-up, resume, steps, evaluation, checkpoints (``python -m hpc_asr.train``).

    mpirun -np 2 python -m hpc_asr.train --config hpc_asr/configs/demo.yaml [--train.epochs 3]

Order follows the Horovod examples: init → pin device → build model → rank 0 restores →
wrap optimizer → broadcast state → distributed sampler with set_epoch → train. Lines that talk
to other ranks are marked ``# dist``.

Preemption: SIGUSR1 or SIGTERM (the scheduler's warning) sets a flag; at the next optimizer
step every rank learns whether any rank got it, rank 0 writes ``last.pt`` at that exact
position, and all ranks exit with status ``EXIT_PREEMPTED`` (3). Relaunching the same command
resumes bitwise where it stopped. With ``dist.elastic`` the loop runs inside ``hvd.elastic.run``.

Beside it in ``hpc_asr.train``: ``preempt`` (signals, exit status, test hooks), ``state``
(position, checkpoint state, config comparison on resume), ``metrics`` (metrics.jsonl,
TensorBoard, progress line).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpc_asr import checkpoint
from hpc_asr import tokenizer as tokenizers
from hpc_asr.config import Config, ConfigError, parse_cli
from hpc_asr.data import BucketBatchSampler, FeatureSet, make_loader
from hpc_asr.dist import Engine, compute_threads, log0, make_engine
from hpc_asr.evaluate import evaluate
from hpc_asr.model import ConformerCTC, subsampled_lengths
from hpc_asr.train.metrics import MetricsWriter, Progress
from hpc_asr.train.preempt import EXIT_PREEMPTED, Preempted, SignalFlag, inf_hook, step_pause, wait_for_signal_hook
from hpc_asr.train.state import ResumeError, new_position, restore, save

__all__ = ["EXIT_PREEMPTED", "Preempted", "autocast_dtype", "flops_per_audio_second", "lr_lambda", "lr_scale",
           "main", "train"]


# ---- schedule ----------------------------------------------------------------------------

def lr_lambda(step: float, warmup: float, total: float) -> float:
    """Linear warmup to the peak, then cosine decay to 5% of it by the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scale(rule: str, global_batch_frames: int, ref_batch_frames: int) -> float:
    """Peak-LR multiplier for a global batch: ``none`` 1, ``linear`` k, ``sqrt`` √k, with
    k = global batch / reference batch (Goyal et al. 2017 for linear; sqrt for Adam-style)."""
    k = global_batch_frames / ref_batch_frames
    return {"none": 1.0, "linear": k, "sqrt": math.sqrt(k)}[rule]


def autocast_dtype(tc, device: torch.device) -> torch.dtype | None:
    """None for fp32; the legacy ``amp: true`` means fp16 on CUDA and bf16 on CPU."""
    p = tc.precision
    if p == "fp32" and tc.amp:
        p = "fp16" if device.type == "cuda" else "bf16"
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[p]


def flops_per_audio_second(model_cfg, num_mel_bins: int = 80, seconds: float = 1.0,
                           frame_shift_ms: float = 10.0) -> float:
    """Forward FLOPs of the model per second of audio, counted by torch.utils.flop_counter on
    one utterance of ``seconds`` (a multiply-add is 2 FLOPs; matmuls and convolutions only).
    Attention grows with length, so longer utterances cost a little more per second; a
    training step costs about 3x the forward."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ConformerCTC(model_cfg, num_mel_bins).eval()
    frames = round(seconds * 1000 / frame_shift_ms)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, frames, num_mel_bins), torch.tensor([frames]))
    return counter.get_total_flops() / seconds


# ---- data checks -------------------------------------------------------------------------

def check_lengths(data: FeatureSet, where: str, max_frames: int) -> None:
    """Every rank scans every length before step 0: an utterance no batch can hold is an error
    naming it and the key, not a crash on whichever rank meets it after an epoch."""
    if len(data) and int(data.num_frames.max()) > max_frames:
        i = int(data.num_frames.argmax())
        n = int((data.num_frames > max_frames).sum())
        raise ValueError(f"{where}: utterance {data.ids[i]} has {int(data.num_frames[i])} frames > "
                         f"data.max_frames={max_frames} ({n} utterance(s) too long); raise data.max_frames")


def usable_subset(num_frames: np.ndarray, model_cfg) -> tuple[np.ndarray, int]:
    """Indices of utterances that leave at least one frame after subsampling, and how many not."""
    out = subsampled_lengths(torch.as_tensor(np.asarray(num_frames, np.int64)), model_cfg.subsample_factor)
    keep = np.nonzero(out.numpy() >= 1)[0]
    return keep, len(num_frames) - len(keep)


class SubsetView:
    """The utterances ``keep`` of a FeatureSet, re-indexed 0..n-1 (what evaluate() reads)."""

    def __init__(self, data: FeatureSet, keep: np.ndarray):
        self.data, self.keep = data, keep
        self.num_frames = data.num_frames[keep]
        self.ids = [data.ids[i] for i in keep]
        self.texts = [data.texts[i] for i in keep]

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, j: int):
        return j, self.data.feats(int(self.keep[j]))


# ---- the run's state ---------------------------------------------------------------------

@dataclass
class _Run:
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
    commit: Callable[[], None] = lambda: None  # Horovod elastic: state.commit() at checkpoint boundaries

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
    return log


def _load_data(cfg: Config, engine: Engine, log) -> tuple[FeatureSet, Any, np.ndarray]:
    """Both splits scanned up front on every rank: too long → error, too short → dropped."""
    train_set, dev_set = FeatureSet(cfg.data.train), FeatureSet(cfg.data.dev)
    if train_set.features != cfg.features:
        raise ValueError(f"{cfg.data.train}: features {train_set.features} differ from config {cfg.features}")
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


def _setup(cfg: Config) -> _Run:
    engine = make_engine(cfg.dist)  # dist: init + pin device; Horovod knobs set before hvd.init()
    world, device = engine.world, engine.device
    torch.set_num_threads(compute_threads(cfg.train.threads, engine))  # dist: collective (affinity per host)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = _open_log(out, world)
    train_set, dev_set, keep = _load_data(cfg, engine, log)
    tok = _make_tokenizer(cfg, train_set, engine, out)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(cfg.train.seed)  # same init everywhere; broadcast below makes it exact
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    model.set_cmvn(train_set.cmvn_mean, train_set.cmvn_std)
    model.to(device)
    sampler = _make_sampler(cfg, train_set, keep, world)
    ddp = engine.wrap_model(model)  # dist: DDP for the torch engine, unchanged for Horovod
    if cfg.train.compile:
        ddp = torch.compile(ddp)
    optimizer = engine.wrap_optimizer(_build_optimizer(cfg, model, device), model,
                                      cfg.train.accum_steps)  # dist: allreduce hooks
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg.train, device) == torch.float16)
    metrics = MetricsWriter(out, enabled=world.is_main, tensorboard=cfg.train.tensorboard)
    return _Run(cfg, engine, tok, train_set, dev_set, keep, model, ddp, optimizer, scaler, sampler, log,
                metrics, out, pos=new_position(world.size, cfg.train.accum_steps))


def _make_sampler(cfg: Config, train_set: FeatureSet, keep: np.ndarray, world) -> BucketBatchSampler:
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

def _resume(run: _Run) -> None:
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
    run.peak_lr, run.total_steps = _schedule(run)
    _set_lr(run)
    if msg["resumed"]:
        p = run.pos
        run.log(f"resumed from {last}: epoch {p['epoch']} batch {p['batch']} step {p['step']} "
                f"(schedule step {p['sched_step']:g})")
        for c in msg["changed"]:
            run.log(f"config changed since the checkpoint: {c}")
    run.log(f"lr {run.optimizer.param_groups[0]['lr']:.6e} scaler {run.scaler.state_dict()}")


def _schedule(run: _Run) -> tuple[float, float]:
    """Peak LR after scaling, and the schedule length in schedule steps: optimizer steps of the
    first run's global batch, so resuming with another world size continues the same curve."""
    cfg, world = run.cfg, run.world
    unit = run.pos["sched_unit"]
    run.sched_inc = (world.size * cfg.train.accum_steps) / (unit["ranks"] * unit["accum_steps"])
    run.steps_per_epoch = math.ceil(len(run.sampler) / cfg.train.accum_steps)
    total = (cfg.train.max_steps or run.steps_per_epoch * cfg.train.epochs) * run.sched_inc
    global_frames = cfg.data.max_frames * cfg.train.accum_steps * world.size
    return cfg.train.lr * lr_scale(cfg.train.lr_scaling, global_frames, cfg.train.ref_batch_frames), total


def _set_lr(run: _Run) -> None:
    lr = run.peak_lr * lr_lambda(run.pos["sched_step"], run.cfg.train.warmup_steps, run.total_steps)
    for g in run.optimizer.param_groups:
        g["lr"] = lr


# ---- batches -----------------------------------------------------------------------------

def epoch_batches(run: _Run, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
    """This rank's batches of ``epoch`` from local batch ``start`` on, collated and augmented (in
    ``data.num_workers`` loader processes): the one place the loop gets data from."""
    cfg = run.cfg
    loader = make_loader(run.train_set, run.sampler, run.tok, cfg.specaug, cfg.train.seed, run.world.rank, epoch,
                         start, num_workers=cfg.data.num_workers, index_map=run.keep)  # dist: set_epoch inside
    for batch in loader:
        yield batch.position, batch


# ---- one step ----------------------------------------------------------------------------

def _forward_backward(run: _Run, batch, gstep: int, boundary: bool) -> None:
    # Seeds derived from (step, rank) make a resumed run draw the same dropout masks.
    torch.manual_seed(run.cfg.train.seed * 100003 + gstep * 7919 + run.world.rank)
    frames = int(batch.feat_lens.sum())  # on the host: no device sync
    batch = batch.to(run.engine.device)
    dtype = autocast_dtype(run.cfg.train, run.engine.device)
    with run.engine.no_sync(run.ddp) if not boundary else contextlib.nullcontext():
        with torch.autocast(run.engine.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            lp, lens = run.ddp(batch.feats, batch.feat_lens)
        loss = run.ctc(lp.float().transpose(0, 1), batch.targets, lens, batch.target_lens)
        loss = loss * inf_hook(run.pos["step"] + 1, run.world.rank)
        run.scaler.scale(loss / len(batch.indices) / run.cfg.train.accum_steps).backward()
    run.win["loss"] += loss.detach().double()  # stays on the device until a log step
    run.win["utts"] += len(batch.indices)
    run.win["frames"] += frames


def _optimizer_step(run: _Run) -> bool:
    """Reduce, unscale, clip, agree on (non-finite gradient, preemption), then step or skip.
    Returns True when some rank was signalled."""
    opt, model = run.optimizer, run.model
    run.engine.synchronize(opt)  # dist: finish allreduce before unscale/clip
    run.scaler.unscale_(opt)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), run.cfg.train.grad_clip)
    wait_for_signal_hook(run.flag, run.world, run.pos["step"] + 1, run.out)
    local = torch.stack([torch.tensor(float(bool(run.flag.raised)), device=grad_norm.device),
                         (~torch.isfinite(grad_norm)).to(torch.float32)]).to(torch.float64)
    signalled, nonfinite = (run.engine.allreduce_sum(local) > 0).tolist()  # dist: any rank
    if nonfinite:  # skip on every rank alike: the weights stay finite and equal
        run.pos["skipped_steps"] += 1
        run.log(f"step {run.pos['step'] + 1}: non-finite gradient norm, step skipped "
                f"({run.pos['skipped_steps']} so far)")
        # no optimizer step; zero_grad below also resets Horovod's "synchronized" state
    else:
        with run.engine.skip_synchronize(opt):  # dist: already reduced above
            run.scaler.step(opt)
    run.scaler.update()
    opt.zero_grad()
    run.win["grad_norm"] = grad_norm
    step_pause()  # test hook
    return bool(signalled)


def _advance(run: _Run, epoch: int, bi: int) -> None:
    p = run.pos
    p["step"] += 1
    p["sched_step"] += run.sched_inc
    p["epoch"], p["batch"], p["gbatch"] = epoch, bi + 1, (bi + 1) * run.world.size
    _set_lr(run)


# ---- logging -----------------------------------------------------------------------------

def _reset_window(run: _Run) -> None:
    run.win = {"loss": torch.zeros((), dtype=torch.float64, device=run.engine.device), "utts": 0,
               "frames": 0, "t": time.time(), "grad_norm": torch.zeros(())}


def _log_step(run: _Run, epoch: int) -> None:
    vec = torch.stack([run.win["loss"].to(torch.float64),
                       torch.tensor(float(run.win["utts"]), dtype=torch.float64, device=run.win["loss"].device),
                       torch.tensor(float(run.win["frames"]), dtype=torch.float64, device=run.win["loss"].device)])
    loss_sum, utts, frames = run.engine.allreduce_sum(vec).tolist()  # dist: metrics reduced first
    dt = time.time() - run.win["t"]
    p = run.pos
    rec = {"step": p["step"], "epoch": epoch, "loss": loss_sum / max(utts, 1),
           "lr": run.win["lr_used"], "grad_norm": float(run.win["grad_norm"]),
           "audio_s_per_s": frames / 100 / max(dt, 1e-9), "wall_s": run.wall(),
           "skipped_steps": p["skipped_steps"], "ranks": run.world.size}
    p["history"].append(rec)
    run.metrics.write("train", rec)
    total = run.cfg.train.max_steps or run.steps_per_epoch * run.cfg.train.epochs
    run.log(f"epoch {epoch} step {p['step']}/{total} loss {rec['loss']:.3f} "
            f"lr {rec['lr']:.2e} |g| {rec['grad_norm']:.2f} {rec['audio_s_per_s']:.0f}x realtime")
    _reset_window(run)


# ---- checkpoints and evaluation ----------------------------------------------------------

def _checkpoint(run: _Run, step_copy: bool = False) -> None:
    """Every rank: average the BatchNorm statistics (a collective); then rank 0 writes last.pt."""
    run.engine.average_batchnorm_stats(run.model)
    save(run, step_copy)


def _evaluate(run: _Run, epoch: int) -> None:
    run.engine.average_batchnorm_stats(run.model)  # dist: dev scores and last.pt use all ranks' statistics
    dev = evaluate(run.model, run.dev_set, run.tok, run.engine, run.cfg)
    p = run.pos
    p["dev"].append({"epoch": epoch, "step": p["step"], **dev})
    run.metrics.write("dev", {"epoch": epoch, "step": p["step"], **dev})
    run.log(f"epoch {epoch} dev loss {dev['loss']:.3f} WER {dev['wer']:.2%} CER {dev['cer']:.2%}")
    best = p.get("best")
    improved = best is None or (dev["wer"], dev["loss"]) < (best["wer"], best["loss"])
    if improved:
        p["best"] = {"epoch": epoch, "step": p["step"], "wer": dev["wer"], "loss": dev["loss"]}
    save(run)  # keep dev history (and the best mark) in the checkpoint too
    if improved and run.world.is_main:
        checkpoint.copy(run.out / "last.pt", run.out / "best.pt")


# ---- the loop ----------------------------------------------------------------------------

def _train_epoch(run: _Run, epoch: int, start: int) -> bool:
    """Returns True when training is over (max_steps reached). Raises Preempted."""
    cfg, p = run.cfg, run.pos
    n_local = len(run.sampler)
    for bi, batch in epoch_batches(run, epoch, start):
        boundary = (bi + 1) % cfg.train.accum_steps == 0 or bi + 1 == n_local
        _forward_backward(run, batch, epoch * n_local + bi, boundary)
        if not boundary:
            continue
        run.win["lr_used"] = run.optimizer.param_groups[0]["lr"]
        signalled = _optimizer_step(run)
        _advance(run, epoch, bi)
        done = bool(cfg.train.max_steps) and p["step"] >= cfg.train.max_steps
        logged = p["step"] % cfg.train.log_every == 0 or done or signalled
        if logged:
            _log_step(run, epoch)
        run.progress.update(p["step"], epoch, p["history"][-1]["loss"] if logged else None)
        if signalled:
            _checkpoint(run)
            run.log(f"preempted (signal) at step {p['step']}: checkpoint {run.out / 'last.pt'}; "
                    f"exiting with status {EXIT_PREEMPTED}")
            raise Preempted
        if done:
            _checkpoint(run)
            return True
        if cfg.train.ckpt_every_steps and p["step"] % cfg.train.ckpt_every_steps == 0:
            _checkpoint(run, step_copy=True)
            run.commit()  # dist (elastic): ranks may leave or join here
    return False


def _start_batch(run: _Run, epoch: int) -> int:
    """Local batch to start ``epoch`` at: the checkpoint counts global batches, so a run resumed
    with another world size skips exactly what the old world had consumed (rounded up)."""
    if epoch != run.pos["epoch"]:
        return 0
    return -(-run.pos["gbatch"] // run.world.size)


def _loop(run: _Run) -> None:
    cfg = run.cfg
    if cfg.train.max_steps and run.pos["step"] >= cfg.train.max_steps:
        return
    for epoch in range(run.pos["epoch"], cfg.train.epochs):
        done = _train_epoch(run, epoch, _start_batch(run, epoch))
        if not done:
            run.pos.update(epoch=epoch + 1, batch=0, gbatch=0)
            _checkpoint(run)
        _evaluate(run, epoch)
        if done:
            return
        run.commit()  # dist (elastic): ranks may leave or join here


def _elastic_loop(run: _Run) -> None:
    """``_loop`` inside ``hvd.elastic.run``. The state (``hvd.elastic.TorchState``) holds the model,
    the optimizer, the position (epoch, global batches, schedule step, history) and the GradScaler;
    it is committed at every checkpoint boundary, where ranks may also leave or join. After a
    reset every rank takes the committed state and recomputes what depends on the world size:
    its share of the batches (sampler), the LR scaling and the schedule increment."""
    tok_sha = hashlib.sha256(json.dumps(run.tok.json_state(), sort_keys=True).encode()).hexdigest()
    state = run.engine.elastic_state(run.model, run.optimizer, pos=copy.deepcopy(run.pos),
                                     scaler=run.scaler.state_dict(), tokenizer_sha=tok_sha)

    def commit() -> None:
        state.pos, state.scaler = copy.deepcopy(run.pos), run.scaler.state_dict()
        state.commit()  # dist: in-memory snapshot; raises HostsUpdatedInterrupt when hosts changed

    @run.engine.elastic_run
    def body(state) -> None:
        if state.tokenizer_sha != tok_sha:
            raise ResumeError("this rank built a different tokenizer than rank 0 (elastic ranks build their "
                              "own): use train.tokenizer char, or resume from a last.pt that holds it")
        run.pos = copy.deepcopy(state.pos)
        run.scaler.load_state_dict(state.scaler)
        run.sampler = _make_sampler(run.cfg, run.train_set, run.keep, run.world)  # dist: the new world's share
        run.peak_lr, run.total_steps = _schedule(run)
        _set_lr(run)
        _reset_window(run)
        run.log(f"elastic: {run.world.size} ranks from step {run.pos['step']} (schedule step "
                f"{run.pos['sched_step']:g}), peak lr {run.peak_lr:.3e}")
        _loop(run)

    run.commit = commit
    body(state)


def _fingerprint(run: _Run) -> dict:
    """This rank's replica state: a hash of every weight and optimizer tensor, the lr and the
    GradScaler state. Ranks that drifted apart (defect: unsynchronised scaler or lr) differ."""
    h = hashlib.sha256()
    for t in list(run.model.state_dict().values()) + [
            v for s in run.optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    finite = all(bool(torch.isfinite(v).all()) for v in run.model.parameters())
    return {"rank": run.world.rank, "weights_sha256": h.hexdigest(), "finite": finite,
            "lr": run.optimizer.param_groups[0]["lr"], "scaler": run.scaler.state_dict()}


def _summary(run: _Run) -> dict:
    p = run.pos
    replicas = run.engine.gather_object(_fingerprint(run))  # dist: every rank's state, for the record
    same = all({**r, "rank": 0} == {**replicas[0], "rank": 0} for r in replicas)
    if not same:
        run.log(f"error: replicas differ at the end of training: {replicas}")
    return {
        "replicas_identical": same, "replicas": replicas,
        "train_wall_s": round(run.wall(), 1), "ranks": run.world.size, "engine": run.engine.name,
        "compression": run.cfg.dist.compression, "steps": p["step"], "skipped_steps": p["skipped_steps"],
        "train_hours": run.train_set.index["hours"], "params": run.model.num_params(), "dev": p["dev"],
        "best": p["best"], "history": p["history"],
    }


def _finish(run: _Run) -> dict:
    summary = _summary(run)
    if run.world.is_main:
        if run.cfg.train.average_last:
            paths = [run.out / n for n in run.pos["step_ckpts"][-run.cfg.train.average_last :]]
            if paths:
                checkpoint.save(run.out / "avg.pt", checkpoint.average(paths))
                run.log(f"avg.pt: mean of {[p.name for p in paths]}")
        (run.out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        run.log(f"done in {summary['train_wall_s']:.0f}s; checkpoint {run.out / 'last.pt'}")
    return summary


def train(cfg: Config) -> dict:
    run = _setup(cfg)
    run.flag = SignalFlag()
    try:
        _resume(run)
        run.ctc = nn.CTCLoss(blank=run.tok.blank, reduction="sum", zero_infinity=True)
        run.log(f"{run.model.num_params() / 1e6:.2f}M params, {len(run.keep)} train utts "
                f"({run.train_set.index['hours']:.2f} h), {run.steps_per_epoch} steps/epoch, "
                f"{run.world.size} ranks, engine {run.engine.name}, compression {cfg.dist.compression}, "
                f"device {run.engine.device}, peak lr {run.peak_lr:.3e} (lr_scaling {cfg.train.lr_scaling})")
        run.t_start, run.wall0 = time.time(), run.pos["wall_s"]
        run.progress = Progress(run.world.is_main and cfg.train.progress,
                                cfg.train.max_steps or run.steps_per_epoch * cfg.train.epochs)
        _reset_window(run)
        _elastic_loop(run) if cfg.dist.elastic else _loop(run)
        summary = _finish(run)
        run.engine.barrier()  # dist: nobody exits while rank 0 still writes
        return summary
    except Preempted:
        run.engine.barrier()  # dist: rank 0 has written last.pt
        raise
    finally:
        if run.progress is not None:
            run.progress.close()
        run.flag.close()
        run.metrics.close()
        run.engine.shutdown()
        run.log.close()


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(argv, "Train Conformer-CTC with Horovod or torch.distributed")
    try:
        train(cfg)
    except Preempted:
        return EXIT_PREEMPTED
    except (FileNotFoundError, ValueError, ResumeError, ConfigError) as e:  # bad data, config or checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
