"""Reading prepared features: dataset over HDF5 shards, length-bucketed distributed batches,
padding collate, batch-vectorised SpecAugment, and the DataLoader that runs them in workers."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from hpc_asr.config import FeatureConfig, SpecAugConfig
from hpc_asr.shards import ShardError, open_shard, read_index
from hpc_asr.tokenizer import CharTokenizer

__all__ = ["Batch", "BucketBatchSampler", "FeatureSet", "augment_batch", "batch_seed", "collate", "make_eval_loader",
           "make_loader", "spec_augment"]


@contextlib.contextmanager
def _one_line(path: Path):
    """A read error inside a shard (truncated, corrupt) becomes one line naming the shard."""
    try:
        yield
    except (OSError, KeyError) as e:
        raise ShardError(f"{path}: unreadable shard ({str(e).splitlines()[0]}); "
                         f"run `python -m data_prep.verify {path.parent}`") from None


class FeatureSet:
    """Utterances of a prepared directory. Only metadata is loaded up front; frames are read per
    item, and HDF5 handles open lazily so DataLoader workers each get their own."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.index = read_index(self.dir)
        self.features = FeatureConfig(**self.index["features"])
        self.cmvn_mean = np.asarray(self.index["cmvn"]["mean"], np.float32)
        self.cmvn_std = np.asarray(self.index["cmvn"]["std"], np.float32)
        shard_of, offsets, frames, self.ids, self.texts = [], [], [], [], []
        for s, shard in enumerate(self.index["shards"]):
            path = self.dir / shard["file"]
            with open_shard(path) as h5, _one_line(path):
                n = len(h5["num_frames"])
                if n != shard["utterances"]:
                    raise ShardError(f"{path}: {n} utterances, index.json says {shard['utterances']}; "
                                     f"run `python -m data_prep.verify {self.dir}`")
                shard_of.append(np.full(n, s, np.int32))
                offsets.append(h5["offsets"][:])
                frames.append(h5["num_frames"][:])
                self.ids += [x.decode() for x in h5["ids"][:]]
                self.texts += [x.decode() for x in h5["texts"][:]]
        self.shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self.num_frames = np.concatenate(frames) if frames else np.zeros(0, np.int32)
        self._files: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def feats(self, i: int) -> np.ndarray:
        s = int(self.shard_of[i])
        path = self.dir / self.index["shards"][s]["file"]
        if s not in self._files:
            self._files[s] = open_shard(path)["feats"]  # the dataset handle keeps its file open
        off = int(self.offsets[i])
        with _one_line(path):
            return self._files[s][off : off + int(self.num_frames[i])]

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        return i, self.feats(i)

    def __getstate__(self):  # open h5py handles can't be pickled into worker processes
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def describe(self) -> str:
        return json.dumps({k: self.index[k] for k in ("utterances", "hours", "ranks")})


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar-length utterances, capped by padded frames and count, dealt to ranks.

    Every rank gets the same number of batches (the list is padded by repeating batches),
    because a rank that runs out early would leave the others blocked in allreduce.
    """

    def __init__(self, num_frames, max_frames: int, max_utts: int, rank: int = 0, size: int = 1,
                 shuffle: bool = True, seed: int = 0, bucket_size: int = 400):
        self.num_frames = np.asarray(num_frames)
        self.max_frames, self.max_utts = max_frames, max_utts
        self.rank, self.size, self.shuffle, self.seed = rank, size, shuffle, seed
        self.bucket_size = bucket_size
        self.epoch = 0
        too_long = int((self.num_frames > max_frames).sum())
        if too_long:
            raise ValueError(f"{too_long} utterances exceed data.max_frames={max_frames} "
                             f"(longest {int(self.num_frames.max())} frames); raise max_frames")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.num_frames)) if self.shuffle else np.arange(len(self.num_frames))
        batches = []
        for start in range(0, len(order), self.bucket_size):
            bucket = order[start : start + self.bucket_size]
            bucket = bucket[np.argsort(self.num_frames[bucket], kind="stable")]
            batch, longest = [], 0
            for i in bucket:
                longest_if = max(longest, int(self.num_frames[i]))
                if batch and (longest_if * (len(batch) + 1) > self.max_frames or len(batch) >= self.max_utts):
                    batches.append(batch)
                    batch, longest_if = [], int(self.num_frames[i])
                batch.append(int(i))
                longest = longest_if
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        pad = (-len(batches)) % self.size
        batches += [batches[i % len(batches)] for i in range(pad)]  # cyclic: pad may exceed len
        return batches

    def __iter__(self):
        return iter(self._batches()[self.rank :: self.size])

    def __len__(self) -> int:
        return len(self._batches()) // self.size


class Batch:
    def __init__(self, feats, feat_lens, targets, target_lens, indices):
        self.feats, self.feat_lens = feats, feat_lens  # (B, T, F) float, (B,) int
        self.targets, self.target_lens = targets, target_lens  # (B, S) int, (B,) int
        self.indices = indices  # dataset indices, for transcripts and ids

        self.position = -1  # local batch index in the epoch, set by the loader

    def to(self, device, non_blocking: bool = False) -> Batch:
        out = Batch(*(x.to(device, non_blocking=non_blocking)
                      for x in (self.feats, self.feat_lens, self.targets, self.target_lens)), self.indices)
        out.position = self.position
        return out

    def pin_memory(self) -> Batch:  # called by the DataLoader's pin-memory thread
        out = Batch(self.feats.pin_memory(), self.feat_lens.pin_memory(), self.targets.pin_memory(),
                    self.target_lens.pin_memory(), self.indices)
        out.position = self.position
        return out


def collate(items, texts: list[str], tokenizer: CharTokenizer) -> Batch:
    idx = [i for i, _ in items]
    lens = torch.tensor([f.shape[0] for _, f in items])
    feats = torch.zeros(len(items), int(lens.max()), items[0][1].shape[1])
    for b, (_, f) in enumerate(items):
        feats[b, : f.shape[0]] = torch.from_numpy(np.asarray(f))
    tok = [tokenizer.encode(texts[i]) for i in idx]
    tlens = torch.tensor([len(t) for t in tok])
    targets = torch.zeros(len(items), max(int(tlens.max()), 1), dtype=torch.long)
    for b, t in enumerate(tok):
        targets[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    return Batch(feats, lens, targets, tlens, idx)


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
    max_w = (cfg.time_width * lens).long().clamp(min=1)
    for _ in range(cfg.time_masks):
        w = (torch.rand(b, generator=gen) * (max_w + 1)).long()
        t0 = (torch.rand(b, generator=gen) * (lens - w).clamp(min=1)).long()
        tmask |= (frames >= t0[:, None]) & (frames < (t0 + w)[:, None])
    mask = (fmask.to(dev)[:, None, :] | tmask.to(dev)[:, :, None]) & valid[:, :, None]
    return torch.where(mask, fill[:, None, None].to(out.dtype), out)


# ---- the loader: batches built in worker processes -----------------------------------------


def batch_seed(seed: int, epoch: int, position: int, rank: int) -> int:
    """The SpecAugment seed of one batch: a function of (seed, epoch, batch position, rank) only,
    so a resumed run, a run with more workers and the main-thread path draw the same masks."""
    return seed * 1_000_003 + epoch * 100_003 + position * 31 + rank


def augment_batch(batch: Batch, cfg: SpecAugConfig, seed: int, epoch: int, rank: int) -> Batch:
    """SpecAugment of one batch with its (seed, epoch, position, rank) draws, on whatever device
    ``batch`` lives: the loader calls it in its workers; on a GPU node the loop may instead build
    the loader with ``specaug=None`` and call it after ``batch.to(device)`` (same draws)."""
    if cfg.enabled:
        gen = torch.Generator().manual_seed(batch_seed(seed, epoch, batch.position, rank))
        batch.feats = spec_augment(batch.feats, batch.feat_lens, cfg, gen)
    return batch


class _Positioned:
    """Batch sampler adaptor: the bucketed sampler's batches from ``start`` on, each index tagged
    with (epoch, position) so the worker that collates it knows its augmentation seed."""

    def __init__(self, sampler, epoch: int, start: int, index_map: np.ndarray | None):
        self.sampler, self.epoch, self.start, self.index_map = sampler, epoch, start, index_map

    def __iter__(self):
        batches = list(self.sampler)
        for pos in range(self.start, len(batches)):
            idx = batches[pos] if self.index_map is None else [int(self.index_map[i]) for i in batches[pos]]
            yield [(self.epoch, pos, i) for i in idx]

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


class _Items(torch.utils.data.Dataset):
    """(epoch, position, index) -> (epoch, position, index, frames); runs in the workers."""

    def __init__(self, data: FeatureSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        epoch, pos, i = key
        j, feats = self.data[i]  # any dataset whose items are (index, frames): FeatureSet or a view of one
        return epoch, pos, j, feats


class _Collate:
    """Pads, tokenizes and augments one batch (picklable, so it runs in the workers)."""

    def __init__(self, texts: list[str], tokenizer: CharTokenizer, specaug: SpecAugConfig | None,
                 seed: int, rank: int):
        self.texts, self.tok, self.specaug, self.seed, self.rank = texts, tokenizer, specaug, seed, rank

    def __call__(self, items) -> Batch:
        epoch, pos = items[0][0], items[0][1]
        batch = collate([(i, f) for _, _, i, f in items], self.texts, self.tok)
        batch.position = pos
        if self.specaug is not None:
            augment_batch(batch, self.specaug, self.seed, epoch, self.rank)
        return batch


def _worker_init(_worker_id: int) -> None:
    """Each worker opens its own HDF5 handles: drop any inherited through fork."""
    obj = torch.utils.data.get_worker_info().dataset.data
    while obj is not None:  # a FeatureSet, or views wrapping one in ``.data``
        if hasattr(obj, "_files"):
            obj._files = {}
        obj = getattr(obj, "data", None)
    torch.set_num_threads(1)


def make_loader(data: FeatureSet, sampler, tokenizer: CharTokenizer, specaug: SpecAugConfig | None,
                seed: int, rank: int, epoch: int, start_batch: int = 0, num_workers: int = 1,
                index_map: np.ndarray | None = None, prefetch: int = 4) -> torch.utils.data.DataLoader:
    """This rank's training batches of ``epoch`` from local batch ``start_batch`` on.

    A ``torch.utils.data.DataLoader`` with the bucketed distributed sampler as its batch sampler;
    ``num_workers`` processes read, collate and augment (0 = in the calling thread, same batches);
    pinned memory when CUDA is present. Each ``Batch`` carries ``position`` (its local index in
    the epoch). ``index_map`` maps the sampler's indices to ``data`` indices (a kept subset).
    """
    sampler.set_epoch(epoch)  # dist: same shuffle on every rank, different slices
    return _loader(data, _Positioned(sampler, epoch, start_batch, index_map),
                   _Collate(data.texts, tokenizer, specaug, seed, rank), num_workers, prefetch)


def make_eval_loader(data: FeatureSet, batches: list[list[int]], tokenizer: CharTokenizer,
                     num_workers: int = 1, prefetch: int = 4) -> torch.utils.data.DataLoader:
    """Evaluation batches (lists of ``data`` indices, in order), read and collated in workers."""
    tagged = [[(0, pos, int(i)) for i in b] for pos, b in enumerate(batches)]
    return _loader(data, tagged, _Collate(data.texts, tokenizer, None, 0, 0), num_workers, prefetch)


def _loader(data, batch_sampler, collate_fn, num_workers: int, prefetch: int):
    extra = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(_Items(data), batch_sampler=batch_sampler, collate_fn=collate_fn,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(), **extra)
