"""Conformer-CTC, top to bottom: CMVN (global, optionally per utterance) → subsampling →
feed-forward → attention → convolution → Conformer layer → encoder → CTC head.

Every forward takes ``(x, lengths)`` and returns ``(y, lengths)``; shapes use B (batch),
T (frames), F (mel bins), D (model width), V (vocabulary), H (heads), N (layers). Forwards avoid
data-dependent Python control flow so TorchScript and ONNX export trace them with dynamic B and T.

``model.streaming`` (WeNet U2's recipe, docs/streaming.md): causal depthwise convolution, attention
in chunks (``forward(..., chunk=c)``; training draws c per batch), and ``forward_chunk``, one chunk
of a stream with explicit caches, giving the chunk-masked forward's output exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpc_asr.config import ModelConfig

__all__ = ["CMVN_MODES", "RECEPTIVE_FIELD", "ConformerCTC", "Dropout", "chunk_mask", "chunk_spans", "dynamic_chunk",
           "make_pad_mask", "subsampled_lengths"]

CMVN_MODES = ("global", "utterance_mean", "utterance")  # model.cmvn
RECEPTIVE_FIELD = 7  # input frames behind one subsampled frame (both front ends): t sees [f·t, f·t + 6]


def make_pad_mask(lengths: Tensor, max_len: int | Tensor) -> Tensor:
    """(B,) lengths → (B, T) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def chunk_mask(size: int | Tensor, chunk: int, left_chunks: int, device: torch.device) -> Tensor:
    """(T, T) bool, True where query i may attend to key j: j's chunk lies in [i's chunk - left_chunks,
    i's chunk] (``left_chunks < 0``: every earlier chunk). WeNet's ``subsequent_chunk_mask``."""
    c = torch.arange(size, device=device) // chunk
    d = c[:, None] - c[None, :]  # how many chunks the key lies behind the query
    return (d >= 0) & (d <= left_chunks) if left_chunks >= 0 else d >= 0


def dynamic_chunk(frames: int, max_chunk: int) -> int:
    """WeNet's dynamic chunk rule for one training batch of ``frames`` subsampled frames: draw
    c ~ U{1..frames-1}; c > frames // 2 → full context (0, about half the batches); otherwise
    c % max_chunk + 1, a chunk of 1..max_chunk frames. Draws from torch's default generator."""
    c = int(torch.randint(1, max(frames, 2), ()).item())
    return 0 if c > frames // 2 else c % max_chunk + 1


def chunk_spans(num_frames: int, chunk: int, factor: int) -> list[tuple[int, int]]:
    """Input windows [start, end) feeding ``forward_chunk`` ``chunk`` output frames at a time: (chunk-1)·f
    + 7 frames every chunk·f, overlapping by 7 - f (WeNet's scheme: the subsampling sees exactly
    what the full forward gives it); the last may be shorter (≥ 7 frames)."""
    window, shift = (chunk - 1) * factor + RECEPTIVE_FIELD, chunk * factor
    return [(s, min(s + window, num_frames)) for s in range(0, num_frames - RECEPTIVE_FIELD + 1, shift)]


def subsampled_lengths(lengths: Tensor, factor: int = 4) -> Tensor:
    """Frames left after two kernel-3 convolutions without padding: strides (2, 2) for factor 4,
    (2, 1) for factor 2."""
    half = torch.div(lengths - 1, 2, rounding_mode="floor")
    return torch.div(half - 1, 2, rounding_mode="floor") if factor == 4 else half - 2


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on CPU. For a CPU mask torch draws one mt19937 number per
    element (~7 ns each), which made dropout 17 % of a demo training step. Here one 64-bit draw
    gives four 16-bit uniforms, compared with p quantised to 1/65536 (0.1 → 0.100006), and kept
    values are scaled by 1 / (1 - that p), so the expectation is exact. Draws come from torch's
    default generator, so ``torch.manual_seed`` and a restored RNG state reproduce the masks.
    Off in eval, and on CUDA (Philox is fast there) it is ``F.dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training, self.inplace)
        drop = round(self.p * 65536)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        u16 = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        mask = torch.ge(u16, drop - 32768).to(x.dtype).mul_(65536 / (65536 - drop))
        return x.mul_(mask) if self.inplace else x * mask


class _GlobalCMVN(nn.Module):
    """Corpus mean/std from prep, stored in the model so checkpoints and exports take raw FBANK."""

    def __init__(self, num_bins: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_bins))
        self.register_buffer("istd", torch.ones(num_bins))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, F)
        return (x - self.mean) * self.istd


class _UtteranceCMVN(nn.Module):
    """Per-utterance (instance) normalisation over each utterance's valid frames, per mel bin:
    mean subtraction (``norm_vars=False``, cepstral mean normalisation) or mean and variance.

    It removes what is constant over an utterance — channel, loudness, a synthesiser's spectral
    tilt — which global CMVN keeps. Padded frames come out as 0. (B, T, F), (B,) → (B, T, F)."""

    def __init__(self, norm_vars: bool, eps: float = 1e-5):
        super().__init__()
        self.norm_vars, self.eps = norm_vars, eps

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        mask = make_pad_mask(lengths, x.shape[1])[..., None].to(x.dtype)  # (B, T, 1)
        n = mask.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1, 1)
        y = (x - (x * mask).sum(1, keepdim=True) / n) * mask
        if self.norm_vars:
            y = y * torch.rsqrt((y * y).sum(1, keepdim=True) / n + self.eps)
        return y


class _Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 2-D convolutions: (B, T, F) → (B, T', D), T' = ((T-1)//2 - 1)//2.

    The classic Conformer front end; on CPU it costs more than the rest of a small model."""

    def __init__(self, num_bins: int, channels: int, d_model: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2), nn.ReLU()
        )
        freq = ((num_bins - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return x, subsampled_lengths(lengths)


class _Conv1dSubsampling(nn.Module):
    """Two kernel-3 1-D convolutions over time with mel bins as channels, strides (2, 2) or
    (2, 1): a fraction of the 2-D front end's cost (the choice for CPU training and small models).

    Factor 2 (50 frames/s) suits character CTC: at 25 frames/s fast speech leaves CTC barely more
    frames than characters, and it learns far more slowly."""

    def __init__(self, num_bins: int, d_model: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = nn.Sequential(
            nn.Conv1d(num_bins, d_model, 3, 2), nn.GELU(), nn.Conv1d(d_model, d_model, 3, factor // 2), nn.GELU()
        )

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.conv(x.transpose(1, 2)).transpose(1, 2), subsampled_lengths(lengths, self.factor)


def _sinusoids(t: int | Tensor, d_model: int, device: torch.device) -> Tensor:
    """(T, D) absolute sinusoidal positions, built for the actual length (no max-length cap)."""
    return _sinusoid_table(torch.arange(t, device=device, dtype=torch.float32), d_model)


def _rel_sinusoids(t: int | Tensor, d_model: int, device: torch.device, cached: int | Tensor = 0) -> Tensor:
    """(2T-1+L, D) sinusoids of the relative positions T-1+L, ..., -(T-1) (query minus key) for T
    queries over L ``cached`` keys before them plus their own T."""
    return _sinusoid_table(torch.arange(t - 1 + cached, -t, -1, device=device, dtype=torch.float32), d_model)


def _sinusoid_table(positions: Tensor, d_model: int) -> Tensor:
    """positions (...) → (..., D)."""
    device = positions.device
    pos = positions[..., None]
    inv = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    ang = pos * inv
    return torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)


class _FeedForward(nn.Module):
    """Pre-norm position-wise FFN with Swish; used twice per layer at half weight (macaron)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.d_model),
            nn.Linear(cfg.d_model, cfg.ff_mult * cfg.d_model),
            nn.SiLU(),
            Dropout(cfg.dropout),
            nn.Linear(cfg.ff_mult * cfg.d_model, cfg.d_model),
            Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _rel_shift(x: Tensor) -> Tensor:
    """(B, H, T, 2T-1+L) scores against relative positions T-1+L … -(T-1) → (B, H, T, T+L) scores
    against keys, the last T of which are the queries themselves: entry (i, j) takes relative
    position i + L - j (Transformer-XL's pad-and-reshape; L = 0 without a cache)."""
    b, h, t, n = x.shape
    x = torch.cat([x.new_zeros(b, h, t, 1), x], dim=-1).reshape(b, h, n + 1, t)
    return x[:, :, 1:].reshape(b, h, t, n)[:, :, :, : n - t + 1]


class _SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over valid frames (scaled_dot_product_attention).

    ``attention: rel`` adds the Conformer paper's relative positions (Transformer-XL; as WeNet and
    ESPnet): score(i, j) = (q_i + u)·k_j + (q_i + v)·W p_{i-j}, the second term passed to SDPA as an
    additive bias, so padding stays masked and the kernel stays fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.drop = Dropout(cfg.dropout)
        self.rel = cfg.attention == "rel"
        if self.rel:
            dh = cfg.d_model // cfg.n_heads
            self.pos = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
            self.pos_u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(cfg.n_heads, dh)))
            self.pos_v = nn.Parameter(nn.init.xavier_uniform_(torch.empty(cfg.n_heads, dh)))

    def forward(self, x: Tensor, mask: Tensor, pos: Tensor | None = None,
                cache: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, T, D); mask (B, T) valid keys, or (B, T, L+T) per query; pos (2T-1+L, D) relative
        sinusoids (``rel`` only); cache (B, H, L, 2·D/H) keys ‖ values of L earlier frames.
        → (y (B, T, D), with a cache: keys ‖ values of all L+T frames (B, H, L+T, 2·D/H))."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k_old, v_old = cache.chunk(2, dim=-1)
            k, v = torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)
        bias = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
        if self.rel and pos is not None:
            p = self.pos(pos).reshape(1, -1, self.heads, d // self.heads).transpose(1, 2)  # (1, H, 2T-1+L, D/H)
            bd = _rel_shift((q + self.pos_v[:, None, :]) @ p.transpose(-1, -2)) / math.sqrt(d // self.heads)
            bias = bd.masked_fill(~bias, float("-inf"))  # (B, H, T, L+T)
            q = q + self.pos_u[:, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D/H)
        kv = torch.cat([k, v], dim=-1) if cache is not None else None
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d))), kv


class _Convolution(nn.Module):
    """Pointwise → GLU → depthwise conv → norm → Swish → pointwise. Padded frames are zeroed
    before the depthwise conv so they never leak into valid ones. BatchNorm (the paper's choice)
    learns faster; LayerNorm keeps every utterance independent of its batch. Streaming makes the
    depthwise conv causal: K-1 frames of left padding, or of cache from the previous chunk."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * d)
        self.lorder = cfg.conv_kernel - 1 if cfg.streaming else 0  # left context of the causal conv
        self.dw = nn.Conv1d(d, d, cfg.conv_kernel, padding=0 if cfg.streaming else cfg.conv_kernel // 2, groups=d)
        self.batch_norm = cfg.conv_norm == "batch"
        self.dw_norm = nn.BatchNorm1d(d) if self.batch_norm else nn.LayerNorm(d)
        self.pw2 = nn.Linear(d, d)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, T, D), mask (B, T); causal only: cache (B, D, K-1), the inputs of the K-1 frames
        before (zeros at the start) → (y (B, T, D), the last K-1 inputs for the next chunk or None)."""
        y = F.glu(self.pw1(self.norm(x)), dim=-1) * mask[..., None]
        y = y.transpose(1, 2)  # (B, D, T)
        new_cache = None
        if self.lorder:
            y = torch.cat([y.new_zeros(y.shape[0], y.shape[1], self.lorder) if cache is None else cache, y], dim=2)
            new_cache = y[:, :, -self.lorder:]
        y = self.dw(y)  # (B, D, T)
        y = self.dw_norm(y).transpose(1, 2) if self.batch_norm else self.dw_norm(y.transpose(1, 2))
        return self.drop(self.pw2(F.silu(y))), new_cache


class _ConformerLayer(nn.Module):
    """x + ½FFN → + MHSA → + Conv → + ½FFN → LayerNorm (Gulati et al., 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ff1 = _FeedForward(cfg)
        self.attn = _SelfAttention(cfg)
        self.conv = _Convolution(cfg)
        self.ff2 = _FeedForward(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, pad: Tensor, att_mask: Tensor, pos: Tensor | None = None,
                att_cache: Tensor | None = None, cnn_cache: Tensor | None = None):
        """x (B, T, D), pad (B, T) valid frames, att_mask as ``_SelfAttention``'s, caches as the
        attention's and the convolution's → (x, all keys ‖ values, new conv cache)."""
        x = x + 0.5 * self.ff1(x)
        y, kv = self.attn(x, att_mask, pos, att_cache)
        x = x + y
        y, cnn_cache = self.conv(x, pad, cnn_cache)
        x = x + y
        x = x + 0.5 * self.ff2(x)
        return self.norm(x), kv, cnn_cache


class ConformerCTC(nn.Module):
    """Conformer encoder with a CTC head. Index 0 of the vocabulary is the CTC blank.

    forward(feats (B, T, F) raw FBANK, lengths (B,)) → (log_probs (B, T', V), out_lengths (B,))
    """

    def __init__(self, cfg: ModelConfig, num_bins: int = 80):
        super().__init__()
        if cfg.vocab_size < 2:
            raise ValueError(f"model.vocab_size must be >= 2 (blank + symbols), got {cfg.vocab_size}")
        self.cfg = cfg
        self.cmvn = _GlobalCMVN(num_bins)
        mode = getattr(cfg, "cmvn", "global")  # global | utterance_mean | utterance (after global)
        if mode not in CMVN_MODES:
            raise ValueError(f"model.cmvn must be {'|'.join(CMVN_MODES)}, got {mode!r}")
        self.utt_cmvn = _UtteranceCMVN(norm_vars=mode == "utterance") if mode != "global" else None
        if cfg.subsampling == "conv1d":
            self.subsample = _Conv1dSubsampling(num_bins, cfg.d_model, cfg.subsample_factor)
        else:
            self.subsample = _Conv2dSubsampling(num_bins, cfg.subsample_channels, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(_ConformerLayer(cfg) for _ in range(cfg.n_layers))
        self.ctc = nn.Linear(cfg.d_model, cfg.vocab_size)

    def set_cmvn(self, mean, std) -> None:
        self.cmvn.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.cmvn.istd.copy_(1.0 / torch.as_tensor(std, dtype=torch.float32))

    def forward(self, feats: Tensor, lengths: Tensor, chunk: int = 0,
                left_chunks: int | None = None) -> tuple[Tensor, Tensor]:
        """``chunk`` > 0: each output frame attends to its chunk of ``chunk`` frames and ``left_chunks``
        (default model.left_chunks; < 0 unlimited) chunks before it, what ``forward_chunk`` computes
        piece by piece. 0: full context, except that a streaming model in training draws its chunk
        per batch (``dynamic_chunk``), so one model serves both."""
        x = self.cmvn(feats)  # (B, T, F)
        if self.utt_cmvn is not None:
            x = self.utt_cmvn(x, lengths)
        x, lengths = self.subsample(x, lengths)  # (B, T', D)
        pad = make_pad_mask(lengths, x.shape[1])
        if self.training and self.cfg.streaming and chunk == 0:
            chunk = dynamic_chunk(x.shape[1], self.cfg.max_train_chunk)
        att_mask = pad
        if chunk > 0:  # (B, T', T'); a padded query also sees itself, so no row is all -inf
            t = x.shape[1]
            left = self.cfg.left_chunks if left_chunks is None else left_chunks
            att_mask = pad[:, None, :] & chunk_mask(t, chunk, left, x.device) | torch.eye(t, dtype=torch.bool,
                                                                                         device=x.device)
        x, pos = self._positions(x)
        for layer in self.layers:
            x, _, _ = layer(x, pad, att_mask, pos)
        return F.log_softmax(self.ctc(x), dim=-1), lengths

    def _positions(self, x: Tensor, offset: Tensor | None = None, cached: int | Tensor = 0):
        """Scale x (B, T', D); ``abs`` adds the sinusoids of frames offset, offset+1, … (0, 1, … without
        one), ``rel`` returns every attention layer's table (``cached`` keys first) → (x, pos | None)."""
        d = self.cfg.d_model
        if self.cfg.attention == "rel":  # positions enter every attention layer, not the input
            return self.drop(x * math.sqrt(d)), _rel_sinusoids(x.shape[1], d, x.device, cached)
        if offset is None:
            return self.drop(x * math.sqrt(d) + _sinusoids(x.shape[1], d, x.device)), None
        frames = offset[:, None] + torch.arange(x.shape[1], device=x.device)[None, :]  # (B, T') absolute positions
        return self.drop(x * math.sqrt(d) + _sinusoid_table(frames.float(), d)), None

    # ---- streaming ------------------------------------------------------------------------------

    def init_cache(self, batch: int = 1, chunk: int | None = None,
                   left_chunks: int | None = None) -> tuple[Tensor, Tensor]:
        """Zero caches of a new stream: attention (B, N, H, chunk·left_chunks, 2·D/H) keys ‖ values, conv
        (B, N, D, K-1). Fixed size: ``forward_chunk`` masks slots before the stream's first frame."""
        cfg = self.cfg
        cache_t = (chunk or cfg.chunk_size) * (cfg.left_chunks if left_chunks is None else left_chunks)
        att = self.ctc.weight.new_zeros(batch, cfg.n_layers, cfg.n_heads, cache_t, 2 * cfg.d_model // cfg.n_heads)
        return att, self.ctc.weight.new_zeros(batch, cfg.n_layers, cfg.d_model, cfg.conv_kernel - 1)  # model's device

    def forward_chunk(self, feats: Tensor, offset: Tensor, att_cache: Tensor,
                      cnn_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One chunk of a stream (streaming models only): feats (B, W, F) raw FBANK of one ``chunk_spans``
        window (global CMVN is applied here, as in ``forward``); offset (B,) int64 output frames of
        this stream so far; att_cache (B, N, H, L, 2·D/H), cnn_cache (B, N, D, K-1) from ``init_cache``
        or the previous call → (log_probs (B, T', V), att_cache, cnn_cache) for the next call. With
        L = chunk·left_chunks the outputs equal ``forward(..., chunk=chunk)``'s, frame for frame."""
        if not self.cfg.streaming:
            raise ValueError("forward_chunk needs a model trained with model.streaming: true (a causal conv)")
        x, _ = self.subsample(self.cmvn(feats), offset)  # (B, T', D); its lengths are not needed
        b, t, cache_t = x.shape[0], x.shape[1], att_cache.shape[3]
        history = torch.arange(cache_t, device=x.device)[None, :] + offset[:, None] - cache_t >= 0  # (B, L)
        att_mask = torch.cat([history, torch.ones(b, t, dtype=torch.bool, device=x.device)], 1)[:, None, :]
        pad = torch.ones(b, t, dtype=torch.bool, device=x.device)
        x, pos = self._positions(x, offset, cache_t)
        new_att, new_cnn = [], []
        for i, layer in enumerate(self.layers):
            x, kv, conv = layer(x, pad, att_mask, pos, att_cache[:, i], cnn_cache[:, i])
            new_att.append(kv[:, :, kv.shape[2] - cache_t:])  # the last L frames
            new_cnn.append(conv)
        return F.log_softmax(self.ctc(x), dim=-1), torch.stack(new_att, 1), torch.stack(new_cnn, 1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
