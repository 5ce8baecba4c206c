"""The learning-rate schedule: linear warmup then cosine decay, the peak scaled to the global batch,
counted in schedule steps so that a run resumed on another world size continues the same curve;
and the model's forward FLOPs per audio second (what a step costs).

With ``train.time_budget_s`` the cosine runs over training wall time instead of steps: the
progress is the ranks' mean of (wall time / budget), agreed at each optimizer step
(``hpc_asr.train.loop``), so every rank sets the same LR and the curve ends where the budget
does on a fast machine and a slow one alike. Such a run is not reproducible step for step."""

from __future__ import annotations

import math

import torch

from hpc_asr.model import ConformerCTC

__all__ = ["flops_per_audio_second", "lr_lambda", "lr_scale", "schedule", "set_lr"]


def lr_lambda(step: float, warmup: float, total: float, progress: float | None = None) -> float:
    """Linear warmup to the peak, then cosine decay to 5% of it by the last step (or, when
    ``progress`` in [0, 1] is given, by the end of the time budget)."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(total - warmup, 1)
    progress = min(max(progress, 0.0), 1.0)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scale(rule: str, global_batch_frames: int, ref_batch_frames: int) -> float:
    """Peak-LR multiplier for a global batch: ``none`` 1, ``linear`` k, ``sqrt`` √k, with
    k = global batch / reference batch (Goyal et al. 2017 for linear; sqrt for Adam-style)."""
    k = global_batch_frames / ref_batch_frames
    return {"none": 1.0, "linear": k, "sqrt": math.sqrt(k)}[rule]


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


def schedule(run) -> tuple[float, float]:
    """Peak LR after scaling, and the schedule length in schedule steps: optimizer steps of the
    first run's global batch, so resuming with another world size continues the same curve."""
    cfg, world = run.cfg, run.world
    unit = run.pos["sched_unit"]
    run.sched_inc = (world.size * cfg.train.accum_steps) / (unit["ranks"] * unit["accum_steps"])
    run.steps_per_epoch = math.ceil(len(run.sampler) / cfg.train.accum_steps)
    total = (cfg.train.max_steps or run.steps_per_epoch * cfg.train.epochs) * run.sched_inc
    global_frames = cfg.data.max_frames * cfg.train.accum_steps * world.size
    return cfg.train.lr * lr_scale(cfg.train.lr_scaling, global_frames, cfg.train.ref_batch_frames), total


def set_lr(run) -> None:
    progress = run.time_progress if run.cfg.train.time_budget_s else None
    lr = run.peak_lr * lr_lambda(run.pos["sched_step"], run.cfg.train.warmup_steps, run.total_steps, progress)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
