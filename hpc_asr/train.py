"""Train Conformer-CTC on prepared features, one process per rank.

    mpirun -np 2 python -m hpc_asr.train --config hpc_asr/configs/demo.yaml [--train.epochs 3]

Order follows the Horovod examples: init → pin device → build model → rank 0 restores →
wrap optimizer → broadcast state → distributed sampler with set_epoch → train. Lines that talk
to other ranks are marked ``# dist``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from hpc_asr import checkpoint
from hpc_asr.config import Config, parse_cli
from hpc_asr.data import BucketBatchSampler, FeatureSet, collate, spec_augment
from hpc_asr.dist import log0, make_engine
from hpc_asr.evaluate import evaluate
from hpc_asr.model import ConformerCTC
from hpc_asr.tokenizer import CharTokenizer


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine decay to 5% of it by the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def train(cfg: Config) -> dict:
    engine = make_engine(cfg.dist.engine, cfg.dist.compression)  # dist: init + pin device
    world, device = engine.world, engine.device
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // world.local_size))
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / f"train.rank{world.rank}.log", "a", buffering=1)

    def log(msg: str) -> None:
        log_file.write(f"{time.strftime('%H:%M:%S')} {world.tag} {msg}\n")
        log0(world, f"[train] {msg}")

    tok = CharTokenizer()
    cfg.model.vocab_size = tok.vocab_size
    train_set, dev_set = FeatureSet(cfg.data.train), FeatureSet(cfg.data.dev)
    if train_set.features != cfg.features:
        raise SystemExit(f"error: {cfg.data.train}: features {train_set.features} differ from config {cfg.features}")
    torch.manual_seed(cfg.train.seed)  # same init everywhere; broadcast below makes it exact
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    model.set_cmvn(train_set.cmvn_mean, train_set.cmvn_std)
    model.to(device)
    sampler = BucketBatchSampler(train_set.num_frames, cfg.data.max_frames, cfg.data.max_utts,
                                 world.rank, world.size, shuffle=True, seed=cfg.train.seed,
                                 bucket_size=cfg.data.bucket_size)  # dist: each rank its own batches
    steps_per_epoch = len(sampler) // cfg.train.accum_steps
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    ddp = engine.wrap_model(model)  # dist: DDP for the torch engine, unchanged for Horovod
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    optimizer = engine.wrap_optimizer(optimizer, model, cfg.train.accum_steps)  # dist: allreduce hooks
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, warmup=cfg.train.warmup_steps, total=total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp and device.type == "cuda")

    pos = {"epoch": 0, "batch": 0, "step": 0, "history": [], "wall_s": 0.0}
    last = out / "last.pt"
    if cfg.train.resume and last.is_file() and world.is_main:  # rank 0 restores, then broadcasts
        state = checkpoint.load(last)
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        pos = state["position"]
        log(f"resumed from {last}: epoch {pos['epoch']} batch {pos['batch']} step {pos['step']}")
    pos = engine.broadcast_object(pos)  # dist
    engine.broadcast_state(model, optimizer)  # dist: everyone starts from rank 0's state
    scheduler.last_epoch = pos["step"]  # non-zero ranks only got the step count
    for g in optimizer.param_groups:
        g["lr"] = cfg.train.lr * lr_lambda(pos["step"], cfg.train.warmup_steps, total_steps)

    ctc = nn.CTCLoss(blank=tok.blank, reduction="sum", zero_infinity=True)
    log(f"{model.num_params() / 1e6:.2f}M params, {len(train_set)} train utts "
        f"({train_set.index['hours']:.2f} h), {steps_per_epoch} steps/epoch, {world.size} ranks, "
        f"engine {engine.name}, compression {cfg.dist.compression}, device {device}")

    def save_checkpoint(epoch: int, batch: int, wall: float) -> None:
        if not world.is_main:
            return
        pos.update(epoch=epoch, batch=batch, wall_s=wall)
        checkpoint.save(last, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "config": cfg.to_dict(), "tokenizer": tok.state_dict(), "position": pos,
        })

    t_start, wall0 = time.time(), pos["wall_s"]
    start_epoch, start_batch = pos["epoch"], pos["batch"]
    win = {"loss": 0.0, "utts": 0, "frames": 0, "t": time.time()}
    done = pos["step"] >= total_steps
    for epoch in range(start_epoch, cfg.train.epochs):
        if done:
            break
        sampler.set_epoch(epoch)  # dist: same shuffle on every rank, different slices
        batches = list(sampler)
        for bi in range(start_batch if epoch == start_epoch else 0, len(batches)):
            # Seeds derived from (step, rank) make a resumed run draw the same masks and dropout.
            gstep = epoch * len(batches) + bi
            torch.manual_seed(cfg.train.seed * 100003 + gstep * 7919 + world.rank)
            batch = collate([train_set[i] for i in batches[bi]], train_set.texts, tok)
            feats = spec_augment(batch.feats, batch.feat_lens, cfg.specaug)
            batch.feats = feats
            batch = batch.to(device)
            boundary = (bi + 1) % cfg.train.accum_steps == 0 or bi + 1 == len(batches)
            with engine.no_sync(ddp) if not boundary else contextlib.nullcontext():
                with _autocast(device, cfg.train.amp):
                    lp, lens = ddp(batch.feats, batch.feat_lens)
                loss = ctc(lp.float().transpose(0, 1), batch.targets, lens, batch.target_lens)
                scaler.scale(loss / len(batch.indices) / cfg.train.accum_steps).backward()
            win["loss"] += float(loss.detach())
            win["utts"] += len(batch.indices)
            win["frames"] += int(batch.feat_lens.sum())
            if not boundary:
                continue
            engine.synchronize(optimizer)  # dist: finish allreduce before unscale/clip
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            with engine.skip_synchronize(optimizer):  # dist: already reduced above
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            scheduler.step()
            pos["step"] += 1
            if pos["step"] % cfg.train.log_every == 0 or pos["step"] == total_steps:
                vec = engine.allreduce_sum(torch.tensor([win["loss"], win["utts"], win["frames"]],
                                                        dtype=torch.float64))  # dist
                dt = time.time() - win["t"]
                rec = {"step": pos["step"], "epoch": epoch, "loss": vec[0].item() / max(vec[1].item(), 1),
                       "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                       "audio_s_per_s": vec[2].item() / 100 / max(dt, 1e-9), "wall_s": wall0 + time.time() - t_start}
                pos["history"].append(rec)
                log(f"epoch {epoch} step {pos['step']}/{total_steps} loss {rec['loss']:.3f} "
                    f"lr {rec['lr']:.2e} |g| {rec['grad_norm']:.2f} {rec['audio_s_per_s']:.0f}x realtime")
                win = {"loss": 0.0, "utts": 0, "frames": 0, "t": time.time()}
            if pos["step"] >= total_steps:
                done = True
                save_checkpoint(epoch, bi + 1, wall0 + time.time() - t_start)
                break
        if not done:
            save_checkpoint(epoch + 1, 0, wall0 + time.time() - t_start)
        dev = evaluate(model, dev_set, tok, engine, cfg)
        pos.setdefault("dev", []).append({"epoch": epoch, "step": pos["step"], **dev})
        log(f"epoch {epoch} dev loss {dev['loss']:.3f} WER {dev['wer']:.2%} CER {dev['cer']:.2%}")
        if world.is_main:  # keep dev history in the checkpoint too
            save_checkpoint(pos["epoch"], pos["batch"], wall0 + time.time() - t_start)

    wall = wall0 + time.time() - t_start
    summary = {
        "train_wall_s": round(wall, 1), "ranks": world.size, "engine": engine.name,
        "compression": cfg.dist.compression, "steps": pos["step"], "train_hours": train_set.index["hours"],
        "params": model.num_params(), "dev": pos.get("dev", []), "history": pos["history"],
    }
    if world.is_main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        log(f"done in {wall:.0f}s; checkpoint {last}")
    engine.barrier()  # dist: nobody exits while rank 0 still writes
    engine.shutdown()
    log_file.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_cli(argv, "Train Conformer-CTC with Horovod or torch.distributed")
    try:
        train(cfg)
    except (FileNotFoundError, ValueError) as e:  # missing/invalid prepared data, too-long utterances
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
