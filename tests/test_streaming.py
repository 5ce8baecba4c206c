"""Streaming Conformer: the offline model unchanged, the chunk mask rule, dynamic chunk training,
``forward_chunk`` with its caches equal to the chunk-masked forward, and the streaming ONNX graph
(chunk by chunk in ONNX Runtime, metadata, the export CLI's parity gate)."""

from __future__ import annotations

import json
import sys

import helpers
import numpy as np
import pytest
import torch

from hpc_asr.config import ConfigError, ModelConfig
from hpc_asr.deploy.streaming import torch_stream
from hpc_asr.model import ConformerCTC, chunk_mask, chunk_spans, dynamic_chunk, subsampled_lengths

BINS, VOCAB = 80, 29
tiny_features = helpers.tiny_features  # the shared session fixture, by module attribute


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_layers=2, ff_mult=2, conv_kernel=5, subsample_channels=8,
                dropout=0.0, vocab_size=VOCAB, streaming=True)
    return ModelConfig(**{**base, **kw})


def streaming_model(seed: int = 0, **kw) -> ConformerCTC:
    """A streaming model in eval mode with non-trivial CMVN and, for BatchNorm, non-trivial statistics."""
    torch.manual_seed(seed)
    m = ConformerCTC(tiny_cfg(**kw), BINS)
    m.set_cmvn(torch.randn(BINS), torch.rand(BINS) + 0.5)  # the stream must apply it inside, as forward does
    if m.cfg.conv_norm == "batch":
        m.train()
        with torch.no_grad():
            m(3 * torch.randn(4, 200, BINS), torch.tensor([200, 180, 150, 90]))
    return m.eval()


# ---- the offline model stays what it was -----------------------------------------------------

@pytest.mark.parametrize("subsampling,attention,want_first,want_sum", [
    ("conv2d", "abs", [-2.68032, -3.21863, -3.47175, -3.15988], -910.145),
    ("conv1d", "rel", [-3.60428, -3.62665, -3.91728, -2.59925], -908.71),
])
def test_offline_model_outputs_are_unchanged(subsampling, attention, want_first, want_sum):
    """Golden values computed with the model code before streaming existed (same seeds)."""
    torch.manual_seed(0)
    m = ConformerCTC(ModelConfig(d_model=32, n_heads=4, n_layers=2, ff_mult=2, conv_kernel=5, subsample_channels=8,
                                 vocab_size=VOCAB, subsampling=subsampling, attention=attention,
                                 conv_norm="batch")).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 60, BINS)
    with torch.no_grad():
        lp, n = m(x, torch.tensor([60, 41]))
    assert n.tolist() == [14, 9]
    torch.testing.assert_close(lp[0, :4, 1], torch.tensor(want_first), atol=2e-5, rtol=0)
    assert float(lp[1, :9].sum()) == pytest.approx(want_sum, abs=1e-2)


def test_checkpoint_without_the_streaming_keys_loads_as_offline(tmp_path):
    """A checkpoint written before streaming existed (no model.streaming/chunk_size/... in its
    config) loads strictly, as the offline model, with the same outputs."""
    from hpc_asr import checkpoint
    from hpc_asr.config import Config
    from hpc_asr.data.tokenizer import CharTokenizer

    cfg = Config()
    cfg.model = ModelConfig(d_model=32, n_heads=4, n_layers=2, ff_mult=2, conv_kernel=5, subsample_channels=8,
                            vocab_size=CharTokenizer().vocab_size)
    torch.manual_seed(0)
    m = ConformerCTC(cfg.model).eval()
    old = cfg.to_dict()
    for key in ("streaming", "chunk_size", "left_chunks", "max_train_chunk"):
        del old["model"][key]
    tok = CharTokenizer().state_dict()
    checkpoint.save(tmp_path / "old.pt", {"model": m.state_dict(), "config": old, "tokenizer": tok})
    loaded, _, loaded_cfg = checkpoint.load_model(tmp_path / "old.pt")
    assert loaded_cfg.model.streaming is False
    x = torch.randn(2, 90, BINS)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([90, 50]))[0], m(x, torch.tensor([90, 50]))[0])


def test_streaming_model_has_the_offline_parameters():
    """Same tensors, same shapes: a streaming model can start from an offline checkpoint's weights."""
    off = ConformerCTC(tiny_cfg(streaming=False)).state_dict()
    on = ConformerCTC(tiny_cfg()).state_dict()
    assert {k: v.shape for k, v in off.items()} == {k: v.shape for k, v in on.items()}


@pytest.mark.parametrize("kw,key", [
    (dict(chunk_size=0), "model.chunk_size"), (dict(left_chunks=0), "model.left_chunks"),
    (dict(max_train_chunk=0), "model.max_train_chunk"), (dict(cmvn="utterance"), "model.cmvn"),
    (dict(chunk_size=2.5), "model.chunk_size"), (dict(conv_kernel=1), "model.conv_kernel"),
])
def test_streaming_config_is_validated(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        tiny_cfg(**kw)
    assert "\n" not in str(e.value)


def test_forward_chunk_refuses_an_offline_model():
    m = ConformerCTC(tiny_cfg(streaming=False))
    with pytest.raises(ValueError, match=r"model\.streaming"):
        m.forward_chunk(torch.zeros(1, 19, BINS), torch.zeros(1, dtype=torch.long), *m.init_cache(1, 4, 1))


# ---- the mask rule and dynamic chunk training ------------------------------------------------

def test_chunk_mask_is_wenets_rule():
    m = chunk_mask(7, 2, 1, torch.device("cpu"))
    for i in range(7):  # row i sees [max((i//2 - 1)·2, 0), min((i//2 + 1)·2, 7))
        lo, hi = max((i // 2 - 1) * 2, 0), min((i // 2 + 1) * 2, 7)
        assert m[i].nonzero().flatten().tolist() == list(range(lo, hi))
    assert torch.equal(chunk_mask(7, 2, -1, torch.device("cpu")),
                       torch.arange(7)[None, :] // 2 <= torch.arange(7)[:, None] // 2)


def test_dynamic_chunk_draws_full_context_about_half_the_time():
    torch.manual_seed(0)
    draws = [dynamic_chunk(100, 25) for _ in range(4000)]
    full = sum(d == 0 for d in draws) / len(draws)
    assert 0.45 < full < 0.55
    assert set(draws) - {0} == set(range(1, 26))  # every chunk of 1..25 frames occurs


def test_training_forward_uses_the_drawn_chunk():
    """Train mode of a streaming model == the eval forward at the chunk dynamic_chunk draws from the
    same RNG state; an offline model draws nothing."""
    m = streaming_model(seed=2, conv_norm="layer")  # dropout 0, LayerNorm: train == eval but for the chunk
    x, lens = torch.randn(3, 203, BINS), torch.tensor([203, 150, 99])
    for seed in range(6):
        torch.manual_seed(seed)
        chunk = dynamic_chunk(int(subsampled_lengths(lens).max()), m.cfg.max_train_chunk)
        torch.manual_seed(seed)
        got, _ = m.train()(x, lens)
        with torch.no_grad():
            want, n = m.eval()(x, lens, chunk=chunk)
        for b, t in enumerate(n.tolist()):
            torch.testing.assert_close(got[b, :t], want[b, :t], atol=1e-5, rtol=0)
    off = ConformerCTC(tiny_cfg(streaming=False)).train()
    torch.manual_seed(0)
    off(x, lens)
    after_offline = torch.randint(0, 2**30, (4,))
    torch.manual_seed(0)
    assert torch.equal(after_offline, torch.randint(0, 2**30, (4,)))  # the offline RNG stream is untouched


def test_chunk_masked_batch_matches_single_utterances_and_has_no_nan():
    """Padding in a chunk-masked batch changes no valid frame, even where a padded chunk sees no
    valid key (a fully masked softmax row: torch 2.13's CPU SDPA returns 0 there, other kernels NaN;
    the model lets a padded query see itself so no row is fully masked)."""
    m = streaming_model(seed=3)
    x, lens = torch.randn(2, 400, BINS), torch.tensor([400, 60])
    with torch.no_grad():
        lp, n = m(x, lens, chunk=2, left_chunks=1)
        assert torch.isfinite(lp).all()
        for b in range(2):
            one, _ = m(x[b: b + 1, : lens[b]], lens[b: b + 1], chunk=2, left_chunks=1)
            torch.testing.assert_close(lp[b, : n[b]], one[0], atol=1e-5, rtol=0)


# ---- forward_chunk == chunk-masked forward ---------------------------------------------------

@pytest.mark.parametrize("subsampling,factor,attention,conv_norm", [
    ("conv2d", 4, "abs", "batch"), ("conv2d", 4, "rel", "layer"),
    ("conv1d", 4, "rel", "batch"), ("conv1d", 2, "abs", "layer"),
])
@pytest.mark.parametrize("chunk,left", [(4, 2), (7, 1)])
def test_chunk_by_chunk_equals_the_chunk_masked_forward(subsampling, factor, attention, conv_norm, chunk, left):
    m = streaming_model(subsampling=subsampling, subsample_factor=factor, attention=attention, conv_norm=conv_norm)
    x = 2 + 3 * torch.randn(1, 333, BINS)
    with torch.no_grad():
        want, n = m(x, torch.tensor([333]), chunk=chunk, left_chunks=left)
        got = torch_stream(m, x, chunk, left)
        full, _ = m(x, torch.tensor([333]))
    assert got.shape == want.shape and got.shape[1] == int(n[0]) > 3 * chunk
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (full - want).abs().max() > 1e-2  # the test can tell chunked context from full context


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunk_by_chunk_on_cuda_equals_the_cpu_chunk_masked_forward():
    m = streaming_model(seed=7, attention="rel")
    x = 2 + 3 * torch.randn(1, 250, BINS)
    with torch.no_grad():
        want, _ = m(x, torch.tensor([250]), chunk=4, left_chunks=2)
        got = torch_stream(m.cuda(), x.cuda(), 4, 2).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["abs", "rel"])
def test_chunk_masked_training_on_cuda_has_finite_gradients(attention):
    """GPU attention kernels may return NaN for a fully masked row; padded chunks must not make one."""
    m = ConformerCTC(tiny_cfg(attention=attention), BINS).cuda().train()
    x, lens = torch.randn(2, 400, BINS, device="cuda"), torch.tensor([400, 60], device="cuda")
    lp, n = m(x, lens, chunk=2, left_chunks=1)
    assert torch.isfinite(lp).all()
    (lp[0, : n[0]].sum() + lp[1, : n[1]].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_chunk_spans_overlap_by_the_receptive_field():
    spans = chunk_spans(107, 4, 4)
    assert spans[:2] == [(0, 19), (16, 35)]  # 19 = 3·4 + 7 frames, every 16: 3 frames overlap
    assert spans[-1] == (96, 107)  # the short last window; 112 would leave < 7 frames
    outs = [int(subsampled_lengths(torch.tensor([e - s]))) for s, e in spans]
    assert outs == [4] * 6 + [2] and sum(outs) == int(subsampled_lengths(torch.tensor([107])))


def test_streams_in_one_batch_at_different_offsets_match_their_solo_runs():
    """Batched streams (a server's dynamic batching): each row keeps its own offset and caches."""
    m = streaming_model(seed=4, attention="abs")
    chunk, left = 4, 2
    xa, xb = torch.randn(1, 170, BINS), torch.randn(1, 170, BINS)
    spans = chunk_spans(170, chunk, 4)
    with torch.no_grad():
        att, cnn = m.init_cache(2, chunk, left)
        a_state = m.init_cache(1, chunk, left)
        outs_a, outs_b = [], []
        # stream a runs 3 chunks alone, then a and b share batches: a at offset 12+, b at 0+
        for k in range(3):
            s, e = spans[k]
            lp, *a_state = m.forward_chunk(xa[:, s:e], torch.tensor([4 * k]), *a_state)
            outs_a.append(lp)
        att[:1], cnn[:1] = a_state
        for k in range(3):
            (sa, ea), (sb, eb) = spans[k + 3], spans[k]
            lp, att, cnn = m.forward_chunk(torch.cat([xa[:, sa:ea], xb[:, sb:eb]]),
                                           torch.tensor([4 * (k + 3), 4 * k]), att, cnn)
            outs_a.append(lp[:1])
            outs_b.append(lp[1:])
        want_a, _ = m(xa[:, : spans[5][1]], torch.tensor([spans[5][1]]), chunk=chunk, left_chunks=left)
        want_b, _ = m(xb[:, : spans[2][1]], torch.tensor([spans[2][1]]), chunk=chunk, left_chunks=left)
    torch.testing.assert_close(torch.cat(outs_a, 1), want_a[:, :24], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(outs_b, 1), want_b[:, :12], atol=1e-5, rtol=0)


# ---- the streaming ONNX graph ----------------------------------------------------------------

@pytest.mark.parametrize("attention", ["abs", "rel"])
def test_streaming_onnx_chunk_by_chunk_equals_pytorch(tmp_path, attention):
    import onnxruntime  # noqa: F401 (pinned: must be there)

    from hpc_asr.deploy.streaming import STREAMING_KEYS, OnnxStream, export_streaming_onnx

    m = streaming_model(seed=5, subsampling="conv1d", attention=attention, conv_norm="batch")
    meta = export_streaming_onnx(m, tmp_path / "s.onnx", 17, chunk=4, left_chunks=2)
    stream = OnnxStream(tmp_path / "s.onnx")
    assert set(stream.meta) == set(STREAMING_KEYS) and stream.meta["chunk_size"] == "4"
    assert meta["window"] == 19 and meta["shift"] == 16 and meta["right_context"] == 6
    assert meta["att_cache_shape"] == [2, 4, 8, 16] and meta["cnn_cache_shape"] == [2, 32, 4]
    x, y = 2 + 3 * torch.randn(1, 287, BINS), 2 + 3 * torch.randn(1, 287, BINS)
    with torch.no_grad():
        want, _ = m(x, torch.tensor([287]), chunk=4, left_chunks=2)
    got = stream.utterance(x[0].numpy())
    np.testing.assert_allclose(got, want[0].numpy(), atol=1e-4, rtol=0)
    state, parts = stream.new_state(), []  # frames arriving in uneven pieces, then end of audio
    for s in range(0, 287, 23):
        parts += stream.step(state, x[0, s: s + 23].numpy())
    assert sum(len(p) for p in parts) < len(got)  # the last chunk waits for more audio ...
    parts += stream.step(state, np.zeros((0, BINS), np.float32), final=True)  # ... until the end
    np.testing.assert_array_equal(np.concatenate(parts), got)
    a_state, b_state = stream.new_state(), stream.new_state()  # two streams batched, b 2 chunks behind a
    spans = chunk_spans(287, 4, 4)
    outs_a, outs_b = [stream.run_chunk(a_state, x[0, s:e].numpy()) for s, e in spans[:2]], []
    for k in range(2, 5):
        (sa, ea), (sb, eb) = spans[k], spans[k - 2]
        la, lb = stream.run_batch([a_state, b_state], [x[0, sa:ea].numpy(), y[0, sb:eb].numpy()])
        outs_a.append(la)
        outs_b.append(lb)
    np.testing.assert_allclose(np.concatenate(outs_a), got[:20], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate(outs_b), stream.utterance(y[0].numpy())[:12], atol=1e-5, rtol=0)
    from hpc_asr.deploy.export import export_onnx

    export_onnx(m, tmp_path / "offline.onnx", 17)
    with pytest.raises(ValueError, match="not a streaming graph"):
        OnnxStream(tmp_path / "offline.onnx")


def test_export_cli_gates_and_writes_the_streaming_graph(tiny_features, tmp_path):
    from conftest import run
    from test_export import save_random_checkpoint

    ckpt = tmp_path / "stream.pt"
    save_random_checkpoint(ckpt, tiny_features["train"], "--model.streaming", "true", "--model.chunk_size", "3",
                           "--model.left_chunks", "2", "--model.subsampling", "conv1d")
    out = tmp_path / "export"
    run([sys.executable, "-m", "hpc_asr", "export", "--checkpoint", str(ckpt), "--data", str(tiny_features["dev"]),
         "--out-dir", str(out), "--max-utts", "3", "--int8", "--waveform"], timeout=400)
    res = json.loads((out / "export.json").read_text())
    s = res["streaming"]
    assert res["parity_ok"] and s["parity_ok"] and s["utterances"] == 3 and s["chunk_size"] == 3
    assert s["onnx_max_abs_diff"] < 1e-3 and s["torch_chunked_max_abs_diff"] < 1e-4
    meta = json.loads((out / "model.json").read_text())
    assert meta["streaming"]["file"] == "streaming.onnx" and meta["streaming"]["window"] == 15
    assert meta["streaming"]["left_chunks"] == 2
    assert meta["variants"] == {"int8": "model.int8.onnx", "streaming_int8": "streaming.int8.onnx",
                                "waveform": {"file": "model.wave.onnx", "inputs": ["waveform", "wave_lens"]}}
    for name in ("model.onnx", "streaming.onnx", "model.int8.onnx", "streaming.int8.onnx", "model.wave.onnx"):
        assert (out / name).is_file(), name
    q = res["int8"]  # quantized, so close to fp32 but not equal; smaller on disk
    assert q["parity_ok"] and q["utterances"] == 3 and 0 < q["max_abs_posterior_diff"] < 0.2
    assert q["frame_agreement"] > 0.7 and q["streaming"]["frame_agreement"] > 0.7 and q["bytes"] < q["fp32_bytes"]
    w = res["waveform"]
    assert w["parity_ok"] and w["signals"] == 4 and w["max_abs_diff"] < 1e-3 and w["transcripts_match"]
    assert not list(out.glob(".*tmp*")) and not list(out.glob("*.tmp*"))


def test_bench_streaming_reports_wer_and_latency(tiny_features, tmp_path):
    """The measurement on a tiny random model: the numbers are meaningless, the structure is not,
    and each stream's transcript equals the chunk-masked forward's."""
    from conftest import run
    from test_export import save_random_checkpoint

    ckpt = tmp_path / "stream.pt"
    save_random_checkpoint(ckpt, tiny_features["train"], "--model.streaming", "true", "--model.left_chunks", "2")
    out = tmp_path / "bench" / "streaming.json"
    proc = run([sys.executable, "-m", "hpc_asr", "bench", "streaming", "--checkpoint", str(ckpt),
                "--data", str(tiny_features["dev"]), "--chunks", "4,2", "--max-utts", "4", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["utterances"] == 4 and res["threads"] == 1 and 0 <= res["offline"]["wer"]
    assert sorted(res["streaming"]) == ["2", "4"] and "chunk 4 (160 ms)" in proc.stderr
    for chunk, r in res["streaming"].items():
        assert r["equals_chunk_masked"] is True and r["mismatched_ids"] == []
        assert r["chunk_ms"] == int(chunk) * 40 and r["wer_cost"] == pytest.approx(r["wer"] - res["offline"]["wer"])
        first, final = r["first_partial_ms"], r["final_after_end_ms"]
        # the first partial needs the first window's audio: (chunk-1)·4 + 7 frames, ending at 10·(W-1) + 25 ms
        assert first["p50"] >= 10 * ((int(chunk) - 1) * 4 + 6) + 25 and first["p50"] <= first["p95"] <= first["max"]
        assert 0 <= final["p50"] <= final["p95"] <= final["max"] < 5000


def test_bench_streaming_refuses_an_offline_model(tiny_features, tmp_path, capsys):
    from test_export import save_random_checkpoint

    from hpc_asr.bench.streaming import main

    ckpt = tmp_path / "offline.pt"
    save_random_checkpoint(ckpt, tiny_features["train"])
    assert main(["--checkpoint", str(ckpt), "--data", str(tiny_features["dev"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not a streaming model" in err and err.count("\n") == 1


def test_streaming_parity_check_catches_a_graph_from_other_weights(tiny_features, tmp_path):
    """The gate's comparison itself: a streaming graph exported from other weights fails it."""
    import onnxruntime  # noqa: F401 (pinned: must be there)

    from hpc_asr.data.loader import FeatureSet
    from hpc_asr.data.tokenizer import CharTokenizer
    from hpc_asr.deploy.export import check_streaming_parity
    from hpc_asr.deploy.streaming import export_streaming_onnx

    data = FeatureSet(tiny_features["dev"])
    ours, other = streaming_model(seed=8), streaming_model(seed=9)
    for m in (ours, other):
        m.set_cmvn(data.cmvn_mean, data.cmvn_std)
    export_streaming_onnx(ours, tmp_path / "ours.onnx", 17, chunk=4, left_chunks=2)
    export_streaming_onnx(other, tmp_path / "other.onnx", 17, chunk=4, left_chunks=2)
    good = check_streaming_parity(ours, CharTokenizer(), tmp_path / "ours.onnx", data, 2)
    bad = check_streaming_parity(ours, CharTokenizer(), tmp_path / "other.onnx", data, 2)
    assert good["onnx_max_abs_diff"] < 1e-4 and good["onnx_transcripts_match"] and good["torch_transcripts_match"]
    assert bad["onnx_max_abs_diff"] > 0.1 and bad["torch_chunked_max_abs_diff"] < 1e-4
