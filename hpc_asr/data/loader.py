"""Reading prepared features: dataset over HDF5 shards, length-bucketed distributed batches,
padding collate, and the DataLoader that runs them (and SpecAugment, ``hpc_asr.data.specaug``) in
workers."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from hpc_asr.config import FeatureConfig, SpecAugConfig
from hpc_asr.data.shards import ShardError, open_shard, read_index, verify_hint
from hpc_asr.data.specaug import augment_batch
from hpc_asr.data.tokenizer import CharTokenizer
from hpc_asr.model import subsampled_lengths

__all__ = ["Batch", "BucketBatchSampler", "FeatureSet", "SubsetView", "check_lengths", "collate", "make_eval_loader",
           "make_loader", "usable_subset"]


@contextlib.contextmanager
def _one_line(path: Path):
    """A read error inside a shard (truncated, corrupt) becomes one line naming the shard."""
    try:
        yield
    except (OSError, KeyError) as e:
        raise ShardError(f"{path}: unreadable shard ({str(e).splitlines()[0]}); {verify_hint(path)}") from None


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
                                     f"run `python -m hpc_asr prep verify {self.dir}`")
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


# ---- checks made before the first step ----------------------------------------------------

def check_lengths(data: FeatureSet, where: str, max_frames: int) -> None:
    """Every rank scans every length before step 0: an utterance no batch can hold is an error
    naming it and the key, not a crash on whichever rank meets it after an epoch."""
    if len(data) and int(data.num_frames.max()) > max_frames:
        i = int(data.num_frames.argmax())
        n = int((data.num_frames > max_frames).sum())
        raise ValueError(f"{where}: utterance {data.ids[i]} has {int(data.num_frames[i])} frames > "
                         f"data.max_frames={max_frames} ({n} utterance(s) too long); raise data.max_frames")


def usable_subset(num_frames: np.ndarray, model_cfg) -> tuple[np.ndarray, int]:
    """Indices of utterances that leave at least one frame after subsampling, and how many not:
    the one too-short rule (training skips them; evaluation scores them as empty hypotheses)."""
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


# ---- the loader: batches built in worker processes -----------------------------------------


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
