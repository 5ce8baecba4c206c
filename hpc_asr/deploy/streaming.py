"""The streaming ONNX model: export (caches as inputs and outputs, metadata for outside runtimes)
and the runtime that feeds it chunk by chunk.

Graph (``streaming.onnx``), all batch-first so concurrent streams batch along axis 0:

    chunk      (B, W, F) float32  raw FBANK, one window of W ≤ (chunk-1)·f + 7 frames
    offset     (B,)      int64    output frames this stream has produced so far
    att_cache  (B, N, H, L, 2·D/H) keys ‖ values of the last L = chunk·left_chunks frames
    cnn_cache  (B, N, D, K-1)      the causal convolution's last K-1 inputs
    → log_probs (B, T', V), new_att_cache, new_cnn_cache (same shapes as the caches)

A stream starts with zero caches and offset 0; windows advance by chunk·f frames and overlap by
7 - f (the subsampling's receptive field), so the stream reproduces the chunk-masked full forward.
The metadata (``onnx`` metadata_props and ``model.json["streaming"]``) carries every number a
runtime needs: ``STREAMING_KEYS``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hpc_asr.model import RECEPTIVE_FIELD, ConformerCTC, chunk_spans

__all__ = ["INPUTS", "OUTPUTS", "STREAMING_KEYS", "OnnxStream", "export_streaming_onnx", "streaming_metadata",
           "torch_stream"]

INPUTS = ["chunk", "offset", "att_cache", "cnn_cache"]
OUTPUTS = ["log_probs", "new_att_cache", "new_cnn_cache"]
STREAMING_KEYS = ("model_type", "chunk_size", "left_chunks", "subsampling_factor", "right_context", "window",
                  "shift", "att_cache_shape", "cnn_cache_shape", "vocab_size", "blank", "num_mel_bins",
                  "frame_shift_ms", "cmvn")


def torch_stream(model: ConformerCTC, feats: torch.Tensor, chunk: int | None = None,
                 left_chunks: int | None = None) -> torch.Tensor:
    """Whole utterances (B, T, F) through PyTorch's ``forward_chunk``, chunk by chunk → (B, T', V)
    log-probs: the reference the ONNX stream is checked against (WeNet's forward_chunk_by_chunk)."""
    chunk = chunk or model.cfg.chunk_size
    att, cnn = model.init_cache(feats.shape[0], chunk, left_chunks)
    offset, out = torch.zeros(feats.shape[0], dtype=torch.long, device=feats.device), []
    for start, end in chunk_spans(feats.shape[1], chunk, model.cfg.subsample_factor):
        lp, att, cnn = model.forward_chunk(feats[:, start:end], offset, att, cnn)
        offset = offset + lp.shape[1]
        out.append(lp)
    return torch.cat(out, 1)


def streaming_metadata(model: ConformerCTC, chunk: int, left_chunks: int) -> dict:
    """What an outside runtime needs to drive ``streaming.onnx`` (cache shapes without the batch)."""
    cfg, f = model.cfg, model.cfg.subsample_factor
    att, cnn = model.init_cache(1, chunk, left_chunks)
    return {
        "model_type": "hpc_asr_conformer_ctc_streaming",
        "chunk_size": chunk,  # output frames per chunk
        "left_chunks": left_chunks,
        "subsampling_factor": f,
        "right_context": RECEPTIVE_FIELD - 1,  # input frames the last output frame of a chunk looks ahead
        "window": (chunk - 1) * f + RECEPTIVE_FIELD,  # input frames per chunk
        "shift": chunk * f,  # input frames between chunk starts
        "att_cache_shape": list(att.shape[1:]),
        "cnn_cache_shape": list(cnn.shape[1:]),
        "vocab_size": cfg.vocab_size,
        "blank": 0,
        "num_mel_bins": model.cmvn.mean.numel(),
        "frame_shift_ms": 10.0,
        "cmvn": "global, inside the graph (input is raw FBANK)",
    }


class _ChunkGraph(nn.Module):
    def __init__(self, model: ConformerCTC):
        super().__init__()
        self.model = model

    def forward(self, chunk, offset, att_cache, cnn_cache):
        return self.model.forward_chunk(chunk, offset, att_cache, cnn_cache)


def export_streaming_onnx(model: ConformerCTC, path: Path, opset: int, chunk: int, left_chunks: int) -> dict:
    """Trace ``forward_chunk`` with dynamic batch and window length, check the graph, attach the
    metadata; returns it."""
    import onnx

    meta = streaming_metadata(model, chunk, left_chunks)
    att, cnn = model.init_cache(2, chunk, left_chunks)
    example = (torch.randn(2, meta["window"], meta["num_mel_bins"]), torch.tensor([3 * chunk, 0]), att, cnn)
    batch = {0: "B"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ChunkGraph(model).eval(), example, str(path), dynamo=False, opset_version=opset,
            input_names=INPUTS, output_names=OUTPUTS,
            dynamic_axes={"chunk": {0: "B", 1: "W"}, "offset": batch, "att_cache": batch, "cnn_cache": batch,
                          "log_probs": {0: "B", 1: "T_out"}, "new_att_cache": batch, "new_cnn_cache": batch},
        )
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, ",".join(map(str, value)) if isinstance(value, list) else str(value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return meta


class OnnxStream:
    """One ONNX Runtime session over ``streaming.onnx``; ``new_state`` starts a stream and
    ``step`` feeds it FBANK frames as they arrive, returning the log-probs of every chunk that
    became complete (``final=True`` flushes the rest at end of audio)."""

    def __init__(self, path: str | Path, threads: int = 1, providers: list[str] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in STREAMING_KEYS if k not in props]
        if missing:
            raise ValueError(f"{path}: not a streaming graph (metadata lacks {', '.join(missing)})")
        self.meta = {k: props[k] for k in STREAMING_KEYS}
        self.window, self.shift = int(props["window"]), int(props["shift"])
        self.att_shape = [int(v) for v in props["att_cache_shape"].split(",")]
        self.cnn_shape = [int(v) for v in props["cnn_cache_shape"].split(",")]

    def new_state(self) -> dict:
        return {"feats": np.zeros((0, int(self.meta["num_mel_bins"])), np.float32), "start": 0, "offset": 0,
                "att": np.zeros([1, *self.att_shape], np.float32), "cnn": np.zeros([1, *self.cnn_shape], np.float32)}

    def run_chunk(self, state: dict, window: np.ndarray) -> np.ndarray:
        """One window (W, F) → (T', V) log-probs; advances ``state``'s caches and offset."""
        lp, state["att"], state["cnn"] = self.session.run(OUTPUTS, {
            "chunk": window[None].astype(np.float32, copy=False), "offset": np.array([state["offset"]], np.int64),
            "att_cache": state["att"], "cnn_cache": state["cnn"]})
        state["offset"] += lp.shape[1]
        return lp[0]

    def run_batch(self, states: list[dict], windows: list[np.ndarray]) -> list[np.ndarray]:
        """One window each of several streams (equal lengths W) in one call: caches and offsets
        stacked along the batch axis, each stream at its own position → their (T', V) log-probs."""
        lp, att, cnn = self.session.run(OUTPUTS, {
            "chunk": np.stack(windows).astype(np.float32, copy=False),
            "offset": np.array([s["offset"] for s in states], np.int64),
            "att_cache": np.concatenate([s["att"] for s in states]),
            "cnn_cache": np.concatenate([s["cnn"] for s in states])})
        for i, s in enumerate(states):
            s["att"], s["cnn"], s["offset"] = att[i: i + 1], cnn[i: i + 1], s["offset"] + lp.shape[1]
        return list(lp)

    def step(self, state: dict, feats: np.ndarray, final: bool = False) -> list[np.ndarray]:
        """Append (T, F) frames; run every window that is now complete (and, when ``final``, the
        last short one) → their (T', V) log-probs in order."""
        state["feats"] = np.concatenate([state["feats"], feats]) if len(feats) else state["feats"]
        out, have = [], len(state["feats"])
        while state["start"] + (RECEPTIVE_FIELD if final else self.window) <= have:
            s = state["start"]
            out.append(self.run_chunk(state, state["feats"][s: s + self.window]))
            state["start"] = s + self.shift
        drop = min(state["start"], have)  # frames no later window needs
        state["feats"], state["start"] = state["feats"][drop:], state["start"] - drop
        return out

    def utterance(self, feats: np.ndarray) -> np.ndarray:
        """A whole utterance (T, F) chunk by chunk → (T', V) log-probs (the parity gate's path)."""
        state = self.new_state()
        spans = chunk_spans(len(feats), int(self.meta["chunk_size"]), int(self.meta["subsampling_factor"]))
        parts = [self.run_chunk(state, feats[s:e]) for s, e in spans]
        return np.concatenate(parts) if parts else np.zeros((0, int(self.meta["vocab_size"])), np.float32)
