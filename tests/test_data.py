"""Batching and input pipeline: rank-sharded buckets, padding collate, SpecAugment, shard reading."""

from __future__ import annotations

from collections import Counter

import helpers
import numpy as np
import pytest
import torch
from helpers import TEXTS, make_feature_dir

from hpc_asr.config import SpecAugConfig
from hpc_asr.data.loader import BucketBatchSampler, FeatureSet, collate, make_eval_loader, make_loader
from hpc_asr.data.specaug import augment_batch, batch_seed, spec_augment
from hpc_asr.data.tokenizer import CharTokenizer

tiny_features = helpers.tiny_features  # the shared session fixture, by module attribute


def lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 400, n)


def rank_batches(num_frames, size, epoch=0, **kw) -> list[list[list[int]]]:
    out = []
    for rank in range(size):
        s = BucketBatchSampler(num_frames, rank=rank, size=size, **{"max_frames": 1000, "max_utts": 8, **kw})
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("size", [2, 3])
def test_each_utterance_once_per_epoch_when_no_padding_needed(size):
    # 24 equal lengths, 4 per batch by frames: 6 batches, which both 2 and 3 ranks divide.
    frames = np.full(24, 250)
    for epoch in range(3):
        per_rank = rank_batches(frames, size, epoch, bucket_size=8)
        assert len({len(b) for b in per_rank}) == 1
        seen = Counter(i for batches in per_rank for batch in batches for i in batch)
        assert seen == Counter(range(24)), f"epoch {epoch}"


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("n", [1, 5, 37, 101])
def test_equal_batch_counts_and_full_coverage(size, n):
    frames = lengths(n, seed=n)
    per_rank = rank_batches(frames, size, epoch=1, bucket_size=16)
    counts = [len(b) for b in per_rank]
    assert len(set(counts)) == 1 and counts[0] >= 1  # a rank that runs out first would hang allreduce
    sampler = BucketBatchSampler(frames, 1000, 8, rank=size - 1, size=size, bucket_size=16)
    sampler.set_epoch(1)
    assert len(sampler) == counts[0]
    seen = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert set(seen) == set(range(n))  # padding repeats batches but never drops one
    # Padding adds at most size-1 batches, so at most that many repeats.
    assert sum(seen.values()) - n <= (size - 1) * 8


@pytest.mark.parametrize("max_frames, max_utts", [(1000, 8), (600, 64), (400, 2)])
def test_batch_caps(max_frames, max_utts):
    frames = lengths(200, seed=3)
    frames = frames[frames <= max_frames]
    s = BucketBatchSampler(frames, max_frames, max_utts, shuffle=True, seed=4, bucket_size=50)
    batches = list(s)
    for batch in batches:
        assert int(frames[batch].max()) * len(batch) <= max_frames  # padded frames, not the sum
        assert len(batch) <= max_utts
    assert sorted(i for b in batches for i in b) == list(range(len(frames)))


def test_buckets_group_similar_lengths():
    frames = lengths(400, seed=5)
    sorted_waste = sum(int(frames[b].max()) * len(b) - int(frames[b].sum())
                       for b in BucketBatchSampler(frames, 2000, 64, bucket_size=400))
    random_waste = 0
    order = np.random.default_rng(0).permutation(400)
    for start in range(0, 400, 8):
        b = order[start : start + 8]
        random_waste += int(frames[b].max()) * len(b) - int(frames[b].sum())
    assert sorted_waste < random_waste / 4


def test_shuffle_depends_on_epoch_and_seed_only():
    frames = lengths(120, seed=6)
    a = rank_batches(frames, 2, epoch=0)
    assert a == rank_batches(frames, 2, epoch=0)  # every rank derives the same global order
    assert a != rank_batches(frames, 2, epoch=1)
    assert a != rank_batches(frames, 2, epoch=0, seed=1)
    s = BucketBatchSampler(frames, 1000, 8, shuffle=True)
    s.set_epoch(3)
    assert list(s) == list(s)  # iterating twice in one epoch replays the epoch


def test_no_shuffle_is_sorted_and_epoch_independent():
    frames = lengths(50, seed=7)
    s = BucketBatchSampler(frames, 10_000, 4, shuffle=False, bucket_size=1000)
    first = list(s)
    s.set_epoch(5)
    assert list(s) == first
    flat = [i for b in first for i in b]
    assert list(frames[flat]) == sorted(frames)


def test_too_long_utterance_raises():
    with pytest.raises(ValueError, match=r"max_frames=500") as e:
        BucketBatchSampler(np.array([100, 900, 200]), 500, 8)
    assert "900" in str(e.value)


# ---- collate, SpecAugment -----------------------------------------------------------------

def test_collate_pads_features_and_targets():
    tok = CharTokenizer()
    texts = ["Go home!", "yes", ""]
    items = [(0, np.ones((5, 3), np.float32)), (1, 2 * np.ones((9, 3), np.float32)),
             (2, 3 * np.ones((2, 3), np.float32))]
    b = collate(items, texts, tok)
    assert b.feats.shape == (3, 9, 3) and b.feat_lens.tolist() == [5, 9, 2]
    assert torch.all(b.feats[0, :5] == 1) and torch.all(b.feats[0, 5:] == 0)
    assert torch.all(b.feats[2, :2] == 3) and torch.all(b.feats[2, 2:] == 0)
    assert b.target_lens.tolist() == [7, 3, 0]
    assert b.targets.shape == (3, 7) and b.targets.dtype == torch.long
    assert tok.decode(b.targets[0].tolist()) == "go home"  # normalised: case and punctuation
    assert b.targets[1, :3].tolist() == tok.encode("yes") and b.targets[1, 3:].eq(0).all()
    assert b.targets[2].eq(0).all() and b.indices == [0, 1, 2]


def _padded_batch():
    torch.manual_seed(0)
    lens = torch.tensor([100, 60, 30])
    feats = torch.randn(3, 100, 80)
    feats[1, 60:] = 0
    feats[2, 30:] = 0
    return feats, lens


def test_spec_augment_masks_only_valid_frames():
    feats, lens = _padded_batch()
    cfg = SpecAugConfig(enabled=True, freq_masks=2, freq_width=15, time_masks=2, time_width=0.2)
    out = spec_augment(feats, lens, cfg, gen=torch.Generator().manual_seed(1))
    assert out is not feats and torch.equal(feats, _padded_batch()[0])  # input left intact
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(out[i, n:], feats[i, n:]), f"utterance {i}: padding touched"
        changed = out[i, :n] != feats[i, :n]
        assert changed.any(), f"utterance {i}: nothing masked"
        fill = feats[i, :n].mean()
        assert torch.allclose(out[i, :n][changed], fill.expand(int(changed.sum())))


def test_spec_augment_reproducible_with_generator():
    feats, lens = _padded_batch()
    cfg = SpecAugConfig(freq_width=15, time_width=0.2)
    a = spec_augment(feats, lens, cfg, gen=torch.Generator().manual_seed(7))
    b = spec_augment(feats, lens, cfg, gen=torch.Generator().manual_seed(7))
    c = spec_augment(feats, lens, cfg, gen=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_freq_warp_stretches_the_mel_axis_and_keeps_padding():
    lens = torch.tensor([6, 3])
    feats = torch.arange(80.0).repeat(2, 6, 1)  # each frame is its own bin index: a ramp
    feats[1, 3:] = 0
    cfg = SpecAugConfig(freq_masks=0, time_masks=0, freq_warp=0.15)
    out = spec_augment(feats, lens, cfg, gen=torch.Generator().manual_seed(3))
    assert torch.equal(out[1, 3:], feats[1, 3:])  # padding stays zero
    for i in range(2):
        row = out[i, 0]
        slope = (row[10] - row[0]) / 10  # the warp factor of this utterance
        assert 0.85 - 1e-6 <= slope <= 1.15 + 1e-6 and abs(slope - 1) > 1e-4
        assert torch.all(row[1:] >= row[:-1]) and row.max() <= 79  # monotone, no new values
        assert torch.equal(out[i, 0], out[i, 1])  # same stretch on every frame
    none = spec_augment(feats, lens, SpecAugConfig(freq_masks=0, time_masks=0, freq_warp=0.0))
    assert torch.equal(none, feats)


def test_spec_augment_disabled_is_a_no_op():
    feats, lens = _padded_batch()
    out = spec_augment(feats, lens, SpecAugConfig(enabled=False))
    assert torch.equal(out, feats)


# ---- reading the shards -------------------------------------------------------------------

def test_feature_set_reads_what_was_written(tiny_features):
    data = FeatureSet(tiny_features["train"])
    assert len(data) == 8 and len(data.index["shards"]) == 2
    assert sorted(data.texts) == sorted(TEXTS[i % len(TEXTS)] for i in range(8))
    assert data.num_frames.sum() == data.index["frames"]
    for i in range(len(data)):
        j, f = data[i]
        assert j == i and f.shape == (data.num_frames[i], 80) and f.dtype == np.float32
    all_frames = np.concatenate([data.feats(i) for i in range(len(data))])
    np.testing.assert_allclose(data.cmvn_mean, all_frames.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(data.cmvn_std, all_frames.std(0), rtol=1e-3, atol=1e-3)
    # id, text and features stay paired: replay the generator that wrote them (helpers.make_feature_dir)
    rng, patterns = np.random.default_rng(0), helpers.char_patterns()
    written = {f"utt0_{k:04d}": (TEXTS[k % len(TEXTS)], helpers._utterance(TEXTS[k % len(TEXTS)], rng, patterns))
               for k in range(8)}
    assert sorted(data.ids) == sorted(written)
    for i, utt in enumerate(data.ids):
        text, feats = written[utt]
        assert data.texts[i] == text, utt
        np.testing.assert_array_equal(data.feats(i), feats, err_msg=utt)


def test_feature_set_rejects_missing_shard(tmp_path):
    d = make_feature_dir(tmp_path / "x", 3, shards=2)
    (d / "shard-00001.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00001\.h5"):
        FeatureSet(d)


# ---- the DataLoader -----------------------------------------------------------------------

AUG = SpecAugConfig(freq_masks=2, freq_width=10, time_masks=2, time_width=0.2, freq_warp=0.1)


def main_thread_batches(data, sampler, tok, seed, rank, epoch, index_map=None):
    """What the training loop built on its own thread before the loader: the reference."""
    sampler.set_epoch(epoch)
    out = []
    for pos, batch in enumerate(sampler):
        idx = batch if index_map is None else [int(index_map[i]) for i in batch]
        b = collate([data[i] for i in idx], data.texts, tok)
        gen = torch.Generator().manual_seed(batch_seed(seed, epoch, pos, rank))
        b.feats = spec_augment(b.feats, b.feat_lens, AUG, gen)
        out.append(b)
    return out


def assert_same(a, b):
    assert a.indices == b.indices
    for k in ("feats", "feat_lens", "targets", "target_lens"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


@pytest.fixture
def loader_setup(tmp_path):
    data = FeatureSet(make_feature_dir(tmp_path / "d", 24, TEXTS, seed=3, shards=3))
    sampler = BucketBatchSampler(data.num_frames, max_frames=800, max_utts=3, rank=1, size=2, seed=5)
    return data, sampler, CharTokenizer()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_equals_main_thread_batches(loader_setup, workers):
    data, sampler, tok = loader_setup
    for epoch in (0, 1):
        ref = main_thread_batches(data, sampler, tok, seed=11, rank=1, epoch=epoch)
        got = list(make_loader(data, sampler, tok, AUG, seed=11, rank=1, epoch=epoch, num_workers=workers))
        assert len(got) == len(ref) == len(sampler) > 3
        for pos, (a, b) in enumerate(zip(got, ref)):
            assert a.position == pos
            assert_same(a, b)
        assert not torch.equal(got[0].feats, collate([data[i] for i in got[0].indices], data.texts, tok).feats)


def test_loader_resume_from_start_batch_gives_the_tail(loader_setup):
    data, sampler, tok = loader_setup
    full = list(make_loader(data, sampler, tok, AUG, seed=2, rank=1, epoch=3, num_workers=1))
    tail = list(make_loader(data, sampler, tok, AUG, seed=2, rank=1, epoch=3, start_batch=2, num_workers=2))
    assert [b.position for b in tail] == list(range(2, len(full)))
    for a, b in zip(tail, full[2:]):
        assert_same(a, b)


def test_loader_index_map_reads_the_kept_subset(loader_setup):
    data, _, tok = loader_setup
    keep = np.arange(0, len(data), 2)
    sampler = BucketBatchSampler(data.num_frames[keep], max_frames=800, max_utts=3, seed=1)
    ref = main_thread_batches(data, sampler, tok, 0, 0, 0, index_map=keep)
    got = list(make_loader(data, sampler, tok, AUG, 0, 0, 0, num_workers=1, index_map=keep))
    assert sorted(i for b in got for i in b.indices) == keep.tolist()
    for a, b in zip(got, ref):
        assert_same(a, b)


def test_eval_loader_is_plain_collate(loader_setup):
    data, _, tok = loader_setup
    batches = [[0, 1, 2], [5], [7, 3]]
    got = list(make_eval_loader(data, batches, tok, num_workers=2))
    for b, idx in zip(got, batches, strict=True):
        assert_same(b, collate([data[i] for i in idx], data.texts, tok))


def test_spec_augment_draws_differ_per_utterance():
    feats = torch.randn(6, 200, 80)
    lens = torch.full((6,), 200)
    out = spec_augment(feats, lens, SpecAugConfig(freq_width=20, time_width=0.2), torch.Generator().manual_seed(0))
    masks = [(out[i] != feats[i]) for i in range(6)]
    assert len({m.sum().item() for m in masks}) > 1, "every utterance got the same mask"


class _View:
    """A re-indexed subset of a FeatureSet, like train.SubsetView (items are (index, frames))."""

    def __init__(self, data, keep):
        self.data, self.keep = data, keep
        self.texts = [data.texts[i] for i in keep]

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, j):
        return j, self.data.feats(int(self.keep[j]))


def test_eval_loader_reads_through_a_view(loader_setup):
    data, _, tok = loader_setup
    data.feats(0)  # an open handle in the parent must not leak into the workers
    view = _View(data, [3, 9, 4, 20])
    got = list(make_eval_loader(view, [[0, 1], [2, 3]], tok, num_workers=2))
    ref = [collate([view[j] for j in b], view.texts, tok) for b in ([0, 1], [2, 3])]
    for a, b in zip(got, ref, strict=True):
        assert_same(a, b)


def test_augment_on_gpu_draws_the_same_masks(loader_setup):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU SpecAugment is checked on GPU nodes")
    data, sampler, tok = loader_setup
    cpu = list(make_loader(data, sampler, tok, AUG, 4, 1, 2, num_workers=0))
    for ref, plain in zip(cpu, make_loader(data, sampler, tok, None, 4, 1, 2, num_workers=0)):
        gpu = augment_batch(plain.to("cuda"), AUG, 4, 2, 1)
        torch.testing.assert_close(gpu.feats.cpu(), ref.feats, atol=1e-4, rtol=1e-5)


def test_zero_widths_mask_nothing():
    """time_width 0 (and freq_width 0) means that mask is off, even with time_masks/freq_masks > 0;
    the same masks with a width mask something (the check can fail)."""
    torch.manual_seed(0)
    lens = torch.tensor([100, 60, 30, 8, 1, 200, 45, 70])
    feats = torch.randn(len(lens), 200, 80)
    off = SpecAugConfig(enabled=True, freq_masks=3, freq_width=0, time_masks=3, time_width=0.0)
    for seed in range(5):
        out = spec_augment(feats, lens, off, gen=torch.Generator().manual_seed(seed))
        assert torch.equal(out, feats), f"seed {seed}: a zero-width mask masked frames"
    on = SpecAugConfig(enabled=True, freq_masks=0, freq_width=0, time_masks=3, time_width=0.05)
    assert not torch.equal(spec_augment(feats, lens, on, gen=torch.Generator().manual_seed(0)), feats)


def test_training_batches_reshuffle_per_epoch_and_seed_and_cover_every_utterance(loader_setup):
    """What the loop receives from make_loader: another epoch or another seed gives another order
    (and other batch compositions), the same (seed, epoch) the same; over both ranks every epoch
    covers every utterance exactly once (so the two ranks' batches are disjoint)."""
    data, _, tok = loader_setup

    def epoch_order(seed: int, epoch: int) -> list[list[list[int]]]:
        out = []
        for rank in (0, 1):
            s = BucketBatchSampler(data.num_frames, max_frames=800, max_utts=3, rank=rank, size=2, seed=seed)
            out.append([b.indices for b in make_loader(data, s, tok, None, seed=0, rank=rank, epoch=epoch,
                                                       num_workers=0)])
        return out

    e0, e1, other_seed = epoch_order(5, 0), epoch_order(5, 1), epoch_order(6, 0)
    assert epoch_order(5, 0) == e0
    for a, b in ((e0, e1), (e0, other_seed)):
        assert a != b
        assert {tuple(sorted(x)) for r in a for x in r} != {tuple(sorted(x)) for r in b for x in r}  # regrouped
    for order in (e0, e1, other_seed):
        flat = [i for r in order for b in r for i in b]
        assert sorted(flat) == list(range(len(data)))  # each once: these lengths need no padding batch
