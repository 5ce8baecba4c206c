"""The offline graph's interface, shared by the export, its variants' gates and TensorRT: the
input and output names of ``model.onnx`` and the zero-padded batch it takes."""

from __future__ import annotations

import numpy as np

__all__ = ["INPUTS", "OUTPUTS", "pad_batch"]

INPUTS, OUTPUTS = ["feats", "feat_lens"], ["log_probs", "out_lens"]


def pad_batch(feats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(batch, frames, bins) float32 zero-padded to the longest, and the int64 lengths."""
    lens = np.array([f.shape[0] for f in feats], np.int64)
    out = np.zeros((len(feats), lens.max(), feats[0].shape[1]), np.float32)
    for i, f in enumerate(feats):
        out[i, : len(f)] = f
    return out, lens
