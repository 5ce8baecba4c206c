"""Conformer-CTC: shapes, length bookkeeping, padding invariance and the attention kernel."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_asr.config import ModelConfig
from hpc_asr.model import ConformerCTC, _SelfAttention, make_pad_mask, subsampled_lengths

BINS, VOCAB = 80, 29


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_layers=2, ff_mult=2, conv_kernel=5, subsample_channels=8,
                dropout=0.1, vocab_size=VOCAB)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module", params=["conv2d", "conv1d"])
def model(request) -> ConformerCTC:
    torch.manual_seed(0)
    m = ConformerCTC(tiny_cfg(subsampling=request.param), BINS)
    m.set_cmvn(torch.randn(BINS), torch.rand(BINS) + 0.5)  # non-trivial CMVN: padding sees it too
    return m.eval()


@pytest.mark.parametrize("t", [7, 8, 9, 10, 11, 50, 101, 240])
def test_subsampled_lengths_match_the_convolutions(model, t):
    x, _ = model.subsample(torch.zeros(1, t, BINS), torch.tensor([t]))
    assert x.shape[1] == int(subsampled_lengths(torch.tensor([t]))) == ((t - 1) // 2 - 1) // 2


def test_output_shapes_and_lengths(model):
    feats, lens = torch.randn(3, 120, BINS), torch.tensor([120, 77, 31])
    with torch.no_grad():
        lp, out_lens = model(feats, lens)
    assert lp.shape == (3, int(subsampled_lengths(torch.tensor(120))), VOCAB)
    assert out_lens.tolist() == [29, 18, 7]  # ((T - 1) // 2 - 1) // 2
    assert torch.allclose(lp.exp().sum(-1), torch.ones(lp.shape[:2]), atol=1e-5)  # log-probabilities


def test_padding_invariance(model):
    """An utterance alone and padded next to a longer one must score its valid frames the same:
    attention masks keys, the convolution zeroes padded frames, positions are absolute."""
    torch.manual_seed(1)
    short, long = torch.randn(1, 63, BINS), torch.randn(1, 150, BINS)
    batch = torch.zeros(2, 150, BINS)
    batch[0, :63], batch[1] = short[0], long[0]
    batch[0, 63:] = 1e3  # garbage, not zeros, in the padding: it must not matter at all
    with torch.no_grad():
        alone, alone_len = model(short, torch.tensor([63]))
        padded, padded_len = model(batch, torch.tensor([63, 150]))
        long_alone, _ = model(long, torch.tensor([150]))
    n = int(alone_len[0])
    assert int(padded_len[0]) == n and alone.shape[1] == n
    torch.testing.assert_close(padded[0, :n], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1], long_alone[0], atol=1e-5, rtol=0)


def test_sdpa_attention_equals_manual_softmax():
    torch.manual_seed(2)
    cfg = tiny_cfg(dropout=0.3)  # eval mode must switch the attention dropout off too
    attn = _SelfAttention(cfg).eval()
    b, t, d, h = 3, 11, cfg.d_model, cfg.n_heads
    x = torch.randn(b, t, d)
    mask = make_pad_mask(torch.tensor([11, 7, 1]), t)
    with torch.no_grad():
        got = attn(x, mask)
        q, k, v = attn.qkv(attn.norm(x)).reshape(b, t, 3, h, d // h).unbind(2)  # each (B, T, H, Dh)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, Dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)  # (B, H, T, T)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        want = attn.proj(y.transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_train_mode_dropout_is_active_eval_is_deterministic(model):
    feats, lens = torch.randn(2, 60, BINS), torch.tensor([60, 45])
    with torch.no_grad():
        a, _ = model(feats, lens)
        b, _ = model(feats, lens)
        model.train()
        try:
            c, _ = model(feats, lens)
        finally:
            model.eval()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("subsampling", ["conv2d", "conv1d"])
def test_gradients_reach_every_parameter(subsampling):
    m = ConformerCTC(tiny_cfg(dropout=0.0, subsampling=subsampling), BINS)
    lp, lens = m(torch.randn(2, 60, BINS), torch.tensor([60, 40]))
    loss = torch.nn.functional.ctc_loss(lp.transpose(0, 1), torch.tensor([[1, 2, 3], [4, 5, 0]]), lens,
                                        torch.tensor([3, 2]))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("vocab", [0, 1])
def test_vocab_size_below_two_raises(vocab):
    with pytest.raises(ValueError, match="vocab_size"):
        ConformerCTC(tiny_cfg(vocab_size=vocab), BINS)
