"""Conformer-CTC: shapes, length bookkeeping, padding invariance and the attention kernel."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_asr.config import ModelConfig
from hpc_asr.model import (
    ConformerCTC,
    Dropout,
    _rel_shift,
    _rel_sinusoids,
    _SelfAttention,
    make_pad_mask,
    subsampled_lengths,
)

BINS, VOCAB = 80, 29


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_layers=2, ff_mult=2, conv_kernel=5, subsample_channels=8,
                dropout=0.1, vocab_size=VOCAB)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module", params=["conv2d", "conv1d", "conv2d-rel"])
def model(request) -> ConformerCTC:
    torch.manual_seed(0)
    subsampling, _, attention = request.param.partition("-")
    m = ConformerCTC(tiny_cfg(subsampling=subsampling, attention=attention or "abs"), BINS)
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
        got, _ = attn(x, mask)
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


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_cpu_dropout_keeps_1_minus_p_and_the_expectation(p):
    """The cheap CPU mask: each element kept with probability 1 - p (p to 1/65536), kept values
    scaled so the mean is unchanged, gradient = the same mask, and torch's seed reproduces it."""
    drop = Dropout(p).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    scale = 65536 / (65536 - round(p * 65536))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.002
    assert torch.equal(y[kept], torch.full_like(y[kept], scale))
    assert abs(y.mean().item() - 1.0) < 0.005
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the same seed, the same mask
    assert not torch.equal(drop(x), y)  # the generator moved on
    # every 16-bit lane of a 64-bit draw is used, and uniform: no column pattern in the mask
    lanes = kept.reshape(-1, 4).float().mean(0)
    assert (lanes - (1 - p)).abs().max() < 0.004, lanes


def test_dropout_off_in_eval_and_at_the_ends():
    x = torch.randn(64, 144)
    assert torch.equal(Dropout(0.1).eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    half = Dropout(0.5).train()(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and set(torch.unique(half / x.to(torch.bfloat16)).tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize(("subsampling", "attention"), [("conv2d", "abs"), ("conv1d", "abs"), ("conv1d", "rel")])
def test_gradients_reach_every_parameter(subsampling, attention):
    m = ConformerCTC(tiny_cfg(dropout=0.0, subsampling=subsampling, attention=attention), BINS)
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


# ---- relative-position attention ------------------------------------------------------------

def test_rel_shift_puts_relative_position_i_minus_j_at_i_j():
    t = 6
    rel = torch.arange(t - 1, -t, -1, dtype=torch.float32)  # the columns: T-1 ... -(T-1)
    x = rel.expand(2, 3, t, 2 * t - 1).clone()
    want = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).float()
    assert torch.equal(_rel_shift(x), want.expand(2, 3, t, t))


def test_rel_attention_equals_explicit_relative_scores():
    torch.manual_seed(3)
    cfg = tiny_cfg(dropout=0.3, attention="rel")
    attn = _SelfAttention(cfg).eval()
    b, t, d, h = 2, 9, cfg.d_model, cfg.n_heads
    dh = d // h
    x, mask = torch.randn(b, t, d), make_pad_mask(torch.tensor([9, 4]), t)
    pos = _rel_sinusoids(t, d, x.device)  # row r is relative position T-1-r
    with torch.no_grad():
        got, _ = attn(x, mask, pos)
        q, k, v = (z.transpose(1, 2) for z in attn.qkv(attn.norm(x)).reshape(b, t, 3, h, dh).unbind(2))
        p = attn.pos(pos).reshape(2 * t - 1, h, dh)
        scores = torch.empty(b, h, t, t)
        for i in range(t):
            for j in range(t):
                pe = p[t - 1 - (i - j)]  # (H, Dh) for relative position i - j
                scores[:, :, i, j] = ((q[:, :, i] + attn.pos_u) * k[:, :, j]).sum(-1) + (
                    (q[:, :, i] + attn.pos_v) * pe).sum(-1)
        scores = (scores / math.sqrt(dh)).masked_fill(~mask[:, None, None, :], float("-inf"))
        want = attn.proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rel_position_embedding_does_not_depend_on_length():
    t = 12
    pos_a = _rel_sinusoids(t, 32, torch.device("cpu"))
    pos_b = _rel_sinusoids(t + 5, 32, torch.device("cpu"))
    # Row r of the table is relative position T-1-r: the same embedding whatever T is.
    torch.testing.assert_close(pos_a, pos_b[5:-5])


def test_rel_model_exports_to_onnx_with_dynamic_time(tmp_path):
    import onnxruntime as ort  # pinned: missing is a failure, not a skip

    from hpc_asr.deploy.export import export_onnx

    torch.manual_seed(5)
    m = ConformerCTC(tiny_cfg(attention="rel", subsampling="conv1d"), BINS).eval()
    path = tmp_path / "rel.onnx"
    export_onnx(m, path, opset=17)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t, lens in [(97, [97, 60, 33]), (301, [301, 250, 120])]:  # neither is the traced length (240)
        feats, lens = torch.randn(3, t, BINS), torch.tensor(lens)
        with torch.no_grad():
            want, want_lens = m(feats, lens)
        got, got_lens = sess.run(None, {"feats": feats.numpy(), "feat_lens": lens.numpy()})
        assert got_lens.tolist() == want_lens.tolist()
        for i, n in enumerate(want_lens.tolist()):  # valid frames only; padding is undefined
            np_close = torch.from_numpy(got[i, :n]) - want[i, :n]
            assert np_close.abs().max() < 1e-4, (t, i)


def test_attention_option_is_validated():
    with pytest.raises(ValueError, match=r"model\.attention"):
        tiny_cfg(attention="relative")


def _cmvn_model(mode: str, seed: int = 6) -> ConformerCTC:
    torch.manual_seed(seed)
    cfg = tiny_cfg(subsampling="conv1d")
    cfg.cmvn = mode  # model.cmvn (ModelConfig field; set as an attribute so the test also runs before it)
    m = ConformerCTC(cfg, BINS).eval()
    m.set_cmvn(torch.randn(BINS), torch.rand(BINS) + 0.5)
    return m


@pytest.mark.parametrize("mode", ["utterance", "utterance_mean"])
def test_utterance_cmvn_normalises_each_utterance_over_its_valid_frames(mode):
    m = _cmvn_model(mode)
    feats, lens = torch.randn(3, 90, BINS) * 4 + 7, torch.tensor([90, 41, 12])
    y = m.utt_cmvn(feats, lens)
    assert y.shape == feats.shape and y.dtype == feats.dtype
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(y[b, :n].mean(0), torch.zeros(BINS), atol=1e-4, rtol=0)
        assert (y[b, n:] == 0).all()  # padding
        if mode == "utterance":
            torch.testing.assert_close(y[b, :n].var(0, unbiased=False), torch.ones(BINS), atol=1e-3, rtol=0)
        else:
            torch.testing.assert_close(y[b, :n], feats[b, :n] - feats[b, :n].mean(0), atol=1e-4, rtol=0)


def test_utterance_cmvn_ignores_a_constant_channel_offset_global_does_not():
    """A per-bin offset over the whole utterance (a channel / synthesiser tilt) leaves the
    utterance-normalised model's output unchanged, padded in a batch or alone."""
    torch.manual_seed(7)
    feats, lens = torch.randn(2, 110, BINS), torch.tensor([110, 64])
    tilt = torch.linspace(-3, 3, BINS)
    shifted = feats + tilt
    shifted[1, 64:] = 1e3  # garbage in the padding must not matter either
    for mode, same in (("utterance", True), ("utterance_mean", True), ("global", False)):
        m = _cmvn_model(mode)
        with torch.no_grad():
            a, _ = m(feats, lens)
            b, _ = m(shifted, lens)
            alone, _ = m(feats[1:, :64], lens[1:])
        assert torch.allclose(a, b, atol=1e-4) is same, mode
        if mode != "global":
            torch.testing.assert_close(a[1, : alone.shape[1]], alone[0], atol=1e-4, rtol=0)


def test_global_cmvn_mode_is_the_default_and_adds_nothing():
    assert ConformerCTC(tiny_cfg(), BINS).utt_cmvn is None
    assert _cmvn_model("global").utt_cmvn is None
    assert set(_cmvn_model("global").state_dict()) == set(_cmvn_model("utterance").state_dict())


def test_bad_cmvn_mode_names_the_key():
    with pytest.raises(ValueError, match=r"model\.cmvn"):
        _cmvn_model("speaker")


def test_utterance_cmvn_model_exports_to_onnx(tmp_path):
    import onnxruntime as ort  # pinned: missing is a failure, not a skip

    from hpc_asr.deploy.export import export_onnx

    m = _cmvn_model("utterance")
    export_onnx(m, tmp_path / "m.onnx", opset=17)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feats, lens = torch.randn(2, 133, BINS) + 2, torch.tensor([133, 70])
    with torch.no_grad():
        want, want_lens = m(feats, lens)
    got, got_lens = sess.run(None, {"feats": feats.numpy(), "feat_lens": lens.numpy()})
    assert got_lens.tolist() == want_lens.tolist()
    for i, n in enumerate(want_lens.tolist()):
        assert (torch.from_numpy(got[i, :n]) - want[i, :n]).abs().max() < 1e-4
