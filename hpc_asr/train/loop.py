"""The training loop: steps, evaluation, checkpoints, the end of a run (``hpc-asr train``).

    mpirun -np 2 python -m hpc_asr train --config hpc_asr/configs/demo.yaml [--train.epochs 3]

Order follows the Horovod examples: init → pin device → build model → rank 0 restores →
wrap optimizer → broadcast state → distributed sampler with set_epoch → train. Lines that talk
to other ranks are marked ``# dist``.

Preemption: SIGUSR1 or SIGTERM (the scheduler's warning) sets a flag; at the next optimizer
step every rank learns whether any rank got it, rank 0 writes ``last.pt`` at that exact
position, and all ranks exit with status ``EXIT_PREEMPTED`` (3). Relaunching the same command
resumes bitwise where it stopped. With ``dist.elastic`` the loop runs inside ``hvd.elastic.run``.
A time budget (``train.time_budget_s``) is agreed the same way: each step the ranks sum their
share of it, and the run ends, checkpointed and evaluated, at the first step where the mean
reaches the budget.

Beside it in ``hpc_asr.train``: ``setup`` (engine, data, tokenizer, model, optimizer, resume),
``schedule`` (the LR curve), ``preempt`` (signals, exit status, test hooks), ``state`` (position,
checkpoint state, config comparison on resume), ``log`` (metrics.jsonl, TensorBoard, progress line).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hpc_asr import checkpoint
from hpc_asr.atomic import write_json_atomic
from hpc_asr.cli import parse_cli
from hpc_asr.config import Config, ConfigError
from hpc_asr.data.loader import make_loader
from hpc_asr.decode.evaluate import evaluate
from hpc_asr.train.log import Progress
from hpc_asr.train.preempt import EXIT_PREEMPTED, Preempted, SignalFlag, inf_hook, step_pause, wait_for_signal_hook
from hpc_asr.train.schedule import schedule, set_lr
from hpc_asr.train.setup import Run, make_sampler, resume, setup, tokenizer_sha256
from hpc_asr.train.state import ResumeError, save

__all__ = ["EXIT_PREEMPTED", "Preempted", "main", "train"]


# ---- batches -----------------------------------------------------------------------------

def epoch_batches(run: Run, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
    """This rank's batches of ``epoch`` from local batch ``start`` on, collated and augmented (in
    ``data.num_workers`` loader processes): the one place the loop gets data from."""
    cfg = run.cfg
    loader = make_loader(run.train_set, run.sampler, run.tok, cfg.specaug, cfg.train.seed, run.world.rank, epoch,
                         start, num_workers=cfg.data.num_workers, index_map=run.keep)  # dist: set_epoch inside
    for batch in loader:
        yield batch.position, batch


# ---- one step ----------------------------------------------------------------------------

def dropout_seed(seed: int, epoch: int, position: int, rank: int) -> int:
    """The dropout seed of one micro-batch: a function of (seed, epoch, local batch position, rank)
    only, never of other epochs' batch counts, so a run resumed in any epoch draws the same masks."""
    key = f"dropout:{seed}:{epoch}:{position}:{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _forward_backward(run: Run, batch, epoch: int, boundary: bool) -> None:
    torch.manual_seed(dropout_seed(run.cfg.train.seed, epoch, batch.position, run.world.rank))
    frames = int(batch.feat_lens.sum())  # on the host: no device sync
    batch = batch.to(run.engine.device)
    dtype = run.cfg.train.autocast_dtype(run.engine.device.type)
    with run.engine.no_sync(run.ddp) if not boundary else contextlib.nullcontext():
        with torch.autocast(run.engine.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            lp, lens = run.ddp(batch.feats, batch.feat_lens)
        loss = run.ctc(lp.float().transpose(0, 1), batch.targets, lens, batch.target_lens)
        loss = loss * inf_hook(run.pos["step"] + 1, run.world.rank)
        run.scaler.scale(loss / len(batch.indices) / run.cfg.train.accum_steps).backward()
    run.win["loss"] += loss.detach().double()  # stays on the device until a log step
    run.win["utts"] += len(batch.indices)
    run.win["frames"] += frames


def _optimizer_step(run: Run) -> bool:
    """Reduce, unscale, clip, agree on (non-finite gradient, preemption, time spent), then step
    or skip. Returns True when some rank was signalled."""
    opt, model = run.optimizer, run.model
    run.engine.synchronize(opt)  # dist: finish allreduce before unscale/clip
    run.scaler.unscale_(opt)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), run.cfg.train.grad_clip)
    wait_for_signal_hook(run.flag, run.world, run.pos["step"] + 1, run.out)
    budget = run.cfg.train.time_budget_s
    local = torch.stack([torch.tensor(float(bool(run.flag.raised)), device=grad_norm.device),
                         (~torch.isfinite(grad_norm)).to(torch.float32),
                         torch.tensor(run.wall() / budget if budget else 0.0, device=grad_norm.device)
                         ]).to(torch.float64)
    signalled, nonfinite, spent = run.engine.allreduce_sum(local).tolist()  # dist: any rank; mean time
    signalled, nonfinite = signalled > 0, nonfinite > 0
    run.time_progress = spent / run.world.size
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


def _advance(run: Run, epoch: int, bi: int) -> None:
    p = run.pos
    p["step"] += 1
    p["sched_step"] += run.sched_inc
    p["epoch"], p["batch"], p["gbatch"] = epoch, bi + 1, (bi + 1) * run.world.size
    set_lr(run)


# ---- logging -----------------------------------------------------------------------------

def _reset_window(run: Run) -> None:
    run.win = {"loss": torch.zeros((), dtype=torch.float64, device=run.engine.device), "utts": 0,
               "frames": 0, "t": time.time(), "grad_norm": torch.zeros(())}


def _log_step(run: Run, epoch: int) -> None:
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
    budget = run.cfg.train.time_budget_s
    total = run.cfg.train.max_steps or run.steps_per_epoch * run.cfg.train.epochs
    where = f"{p['step']} ({run.time_progress:.0%} of {budget:.0f}s)" if budget else f"{p['step']}/{total}"
    run.log(f"epoch {epoch} step {where} loss {rec['loss']:.3f} "
            f"lr {rec['lr']:.2e} |g| {rec['grad_norm']:.2f} {rec['audio_s_per_s']:.0f}x realtime")
    _reset_window(run)


# ---- checkpoints and evaluation ----------------------------------------------------------

def _checkpoint(run: Run, step_copy: bool = False) -> None:
    """Every rank: average the BatchNorm statistics (a collective); then rank 0 writes last.pt."""
    run.engine.average_batchnorm_stats(run.model)
    save(run, step_copy)


def _evaluate(run: Run, epoch: int) -> None:
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

def _train_epoch(run: Run, epoch: int, start: int) -> bool:
    """Returns True when training is over (max_steps or the time budget reached). Raises Preempted."""
    cfg, p = run.cfg, run.pos
    run.sampler.set_epoch(epoch)  # dist: this epoch's batches first; their count changes with the shuffle
    n_local = len(run.sampler)
    for bi, batch in epoch_batches(run, epoch, start):
        boundary = (bi + 1) % cfg.train.accum_steps == 0 or bi + 1 == n_local  # the last group steps too
        _forward_backward(run, batch, epoch, boundary)
        if not boundary:
            continue
        run.win["lr_used"] = run.optimizer.param_groups[0]["lr"]
        signalled = _optimizer_step(run)
        _advance(run, epoch, bi)
        out_of_time = bool(cfg.train.time_budget_s) and run.time_progress >= 1.0
        done = out_of_time or (bool(cfg.train.max_steps) and p["step"] >= cfg.train.max_steps)
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
            if out_of_time:
                run.log(f"time budget of {cfg.train.time_budget_s:.0f}s spent at step {p['step']}")
            _checkpoint(run)
            return True
        if cfg.train.ckpt_every_steps and p["step"] % cfg.train.ckpt_every_steps == 0:
            _checkpoint(run, step_copy=True)
            run.commit()  # dist (elastic): ranks may leave or join here
    return False


def _start_batch(run: Run, epoch: int) -> int:
    """Local batch to start ``epoch`` at: the checkpoint counts global batches, so a run resumed
    with another world size skips exactly what the old world had consumed (rounded up)."""
    if epoch != run.pos["epoch"]:
        return 0
    return -(-run.pos["gbatch"] // run.world.size)


def _loop(run: Run) -> None:
    cfg = run.cfg
    if cfg.train.max_steps and run.pos["step"] >= cfg.train.max_steps:
        return
    if cfg.train.time_budget_s and run.pos["wall_s"] >= cfg.train.time_budget_s:
        run.log(f"time budget of {cfg.train.time_budget_s:.0f}s already spent ({run.pos['wall_s']:.0f}s)")
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


def _elastic_loop(run: Run) -> None:
    """``_loop`` inside ``hvd.elastic.run``. The state (``hvd.elastic.TorchState``) holds the model,
    the optimizer, the position (epoch, global batches, schedule step, history) and the GradScaler;
    it is committed at every checkpoint boundary, where ranks may also leave or join. After a
    reset every rank takes the committed state and recomputes what depends on the world size:
    its share of the batches (sampler), the LR scaling and the schedule increment."""
    tok_sha = tokenizer_sha256(run.tok)
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
        run.sampler = make_sampler(run.cfg, run.train_set, run.keep, run.world)  # dist: the new world's share
        run.peak_lr, run.total_steps = schedule(run)
        set_lr(run)
        _reset_window(run)
        run.log(f"elastic: {run.world.size} ranks from step {run.pos['step']} (schedule step "
                f"{run.pos['sched_step']:g}), peak lr {run.peak_lr:.3e}")
        _loop(run)

    run.commit = commit
    body(state)


def _fingerprint(run: Run) -> dict:
    """This rank's replica state: a hash of every weight and optimizer tensor, the lr and the
    GradScaler state. Ranks that drifted apart (defect: unsynchronised scaler or lr) differ."""
    h = hashlib.sha256()
    for t in list(run.model.state_dict().values()) + [
            v for s in run.optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    finite = all(bool(torch.isfinite(v).all()) for v in run.model.parameters())
    return {"rank": run.world.rank, "weights_sha256": h.hexdigest(), "finite": finite,
            "lr": run.optimizer.param_groups[0]["lr"], "scaler": run.scaler.state_dict()}


def _summary(run: Run) -> dict:
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


def _finish(run: Run) -> dict:
    summary = _summary(run)
    if run.world.is_main:
        if run.cfg.train.average_last:
            paths = [run.out / n for n in run.pos["step_ckpts"][-run.cfg.train.average_last :]]
            if paths:
                checkpoint.save(run.out / "avg.pt", checkpoint.average(paths))
                run.log(f"avg.pt: mean of {[p.name for p in paths]}")
        write_json_atomic(run.out / "train_summary.json", summary)
        run.log(f"done in {summary['train_wall_s']:.0f}s; checkpoint {run.out / 'last.pt'}")
    return summary


def train(cfg: Config) -> dict:
    run = setup(cfg)
    run.flag = SignalFlag()
    try:
        resume(run)
        run.ctc = nn.CTCLoss(blank=run.tok.blank, reduction="sum", zero_infinity=True)
        run.log(f"{run.model.num_params() / 1e6:.2f}M params, {len(run.keep)} train utts "
                f"({run.train_set.index['hours']:.2f} h), {run.steps_per_epoch} steps/epoch, "
                f"{run.world.size} ranks, engine {run.engine.name}, compression {cfg.dist.compression}, "
                f"device {run.engine.device}, peak lr {run.peak_lr:.3e} (lr_scaling {cfg.train.lr_scaling})")
        run.t_start, run.wall0 = time.time(), run.pos["wall_s"]
        run.progress = Progress(run.world.is_main and cfg.train.progress,
                                cfg.train.max_steps or run.steps_per_epoch * cfg.train.epochs,
                                budget_s=cfg.train.time_budget_s - run.wall0 if cfg.train.time_budget_s else 0.0)
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
        if run.lock is not None:
            run.lock.release()  # the next run in this out_dir, in this process or another, may start


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
