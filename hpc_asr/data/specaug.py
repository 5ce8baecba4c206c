"""SpecAugment (Park et al., 2019) with mel-axis warping, vectorised over a batch, and the seed rule
that makes a batch's masks a function of (seed, epoch, position, rank) only."""

from __future__ import annotations

import torch

from hpc_asr.config import SpecAugConfig

__all__ = ["augment_batch", "batch_seed", "spec_augment"]


def _freq_warp(feats: torch.Tensor, width: float, gen: torch.Generator | None) -> torch.Tensor:
    """Stretch each utterance's mel axis by a random factor in [1 - width, 1 + width], a
    feature-domain vocal-tract-length perturbation (Jaitly & Hinton, 2013): it imitates voices
    the corpus lacks, which is what held-out speakers need."""
    b, t, f = feats.shape
    alpha = 1 + (torch.rand(b, generator=gen) * 2 - 1) * width
    src = (torch.arange(f, dtype=torch.float32)[None, :] * alpha[:, None]).clamp(0, f - 1)  # (B, F)
    src = src.to(feats.device)  # drawn on the CPU generator; applied where the batch lives
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=f - 1)
    w = (src - lo)[:, None, :]
    below = feats.gather(2, lo[:, None, :].expand(b, t, f))
    above = feats.gather(2, hi[:, None, :].expand(b, t, f))
    return below * (1 - w) + above * w


def _fill_values(out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) mean of each utterance's valid frames."""
    n = valid.sum(1).clamp(min=1) * out.shape[2]
    return (out * valid[:, :, None]).sum((1, 2)) / n


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, cfg: SpecAugConfig,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """Optional mel-axis warping, then frequency and time masking (Park et al., 2019) filled with
    each utterance's mean so the masked region looks like neutral input after CMVN. Vectorised
    over the batch: every draw is a (B,) tensor from ``gen``, in a fixed order, so a batch's
    augmentation depends only on the generator's seed. Padding is never touched. Returns a new
    tensor; works on any device (draws are made on the CPU generator, then moved)."""
    if not cfg.enabled:
        return feats
    b, t, f = feats.shape
    dev = feats.device
    out = _freq_warp(feats, cfg.freq_warp, gen) if cfg.freq_warp > 0 else feats.clone()
    lens = lengths.to("cpu", torch.long)
    valid = (torch.arange(t)[None, :] < lens[:, None]).to(dev)  # (B, T)
    fill = _fill_values(out, valid)  # (B,)
    fmask = torch.zeros(b, f, dtype=torch.bool)
    bins = torch.arange(f)[None, :]
    for _ in range(cfg.freq_masks):
        w = torch.randint(0, cfg.freq_width + 1, (b,), generator=gen)
        f0 = (torch.rand(b, generator=gen) * (f - w).clamp(min=1)).long()
        fmask |= (bins >= f0[:, None]) & (bins < (f0 + w)[:, None])
    tmask = torch.zeros(b, t, dtype=torch.bool)
    frames = torch.arange(t)[None, :]
    # at least one frame when masking is on (short utterances), none at all when time_width is 0
    max_w = (cfg.time_width * lens).long().clamp(min=1) if cfg.time_width > 0 else torch.zeros_like(lens)
    for _ in range(cfg.time_masks):
        w = (torch.rand(b, generator=gen) * (max_w + 1)).long()
        t0 = (torch.rand(b, generator=gen) * (lens - w).clamp(min=1)).long()
        tmask |= (frames >= t0[:, None]) & (frames < (t0 + w)[:, None])
    mask = (fmask.to(dev)[:, None, :] | tmask.to(dev)[:, :, None]) & valid[:, :, None]
    return torch.where(mask, fill[:, None, None].to(out.dtype), out)


def batch_seed(seed: int, epoch: int, position: int, rank: int) -> int:
    """The SpecAugment seed of one batch: a function of (seed, epoch, batch position, rank) only,
    so a resumed run, a run with more workers and the main-thread path draw the same masks."""
    return seed * 1_000_003 + epoch * 100_003 + position * 31 + rank


def augment_batch(batch, cfg: SpecAugConfig, seed: int, epoch: int, rank: int) :
    """SpecAugment of one batch with its (seed, epoch, position, rank) draws, on whatever device
    ``batch`` lives: the loader calls it in its workers; on a GPU node the loop may instead build
    the loader with ``specaug=None`` and call it after ``batch.to(device)`` (same draws)."""
    if cfg.enabled:
        gen = torch.Generator().manual_seed(batch_seed(seed, epoch, batch.position, rank))
        batch.feats = spec_augment(batch.feats, batch.feat_lens, cfg, gen)
    return batch
