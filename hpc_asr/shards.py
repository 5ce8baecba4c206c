"""The on-disk feature format: one HDF5 shard per prep rank plus ``index.json``.

Why this shape: on Lustre, many ranks writing one HDF5 file needs parallel HDF5 and file locks
that many sites disable. One file per rank needs neither; each is written under a temporary name
and renamed, so a killed job never leaves a half-written shard that looks complete. Each shard
stores all its frames in one contiguous 2-D dataset (fast sequential reads, few metadata ops)
with per-utterance offsets.

Shard datasets: ``feats`` (frames, bins) float32, ``offsets`` int64, ``num_frames`` int32,
``ids``/``texts``/``speakers`` utf-8 strings, ``durations`` float32. Attributes: ``format``,
``version``, ``features`` (JSON of FeatureConfig).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from hpc_asr.config import FeatureConfig

__all__ = ["FORMAT", "VERSION", "ShardWriter", "open_h5", "read_index", "write_json_atomic"]

FORMAT = "hpc_asr.fbank"
VERSION = 1


def open_h5(path: str | Path, mode: str = "r"):
    """Open HDF5 without file locking: shards are single-writer by construction, and Lustre/NFS
    mounts without flock make HDF5's own locking fail with 'unable to lock file'."""
    import h5py

    return h5py.File(path, mode, locking=False)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class ShardWriter:
    """Accumulates utterances and writes one shard atomically on ``close()``."""

    def __init__(self, path: str | Path, features: FeatureConfig, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.features = features
        self.meta = meta or {}
        self._feats: list[np.ndarray] = []
        self._rows: list[tuple[str, str, str, float]] = []

    def add(self, utt_id: str, feats: np.ndarray, text: str, speaker: str, duration: float) -> None:
        if feats.ndim != 2 or feats.shape[1] != self.features.num_mel_bins:
            raise ValueError(f"{utt_id}: feats shape {feats.shape}, expected (T, {self.features.num_mel_bins})")
        self._feats.append(feats.astype(np.float32, copy=False))
        self._rows.append((utt_id, text, speaker, duration))

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def frames(self) -> int:
        return sum(f.shape[0] for f in self._feats)

    def close(self) -> dict[str, Any]:
        """Write the shard; returns its summary row for the index."""
        import h5py

        bins = self.features.num_mel_bins
        lengths = np.array([f.shape[0] for f in self._feats], np.int32)
        offsets = np.zeros(len(lengths), np.int64)
        if len(lengths):
            offsets[1:] = np.cumsum(lengths, dtype=np.int64)[:-1]
        tmp = self.path.with_name(self.path.name + ".tmp")
        strings = h5py.string_dtype("utf-8")
        with open_h5(tmp, "w") as h5:
            feats = np.concatenate(self._feats) if self._feats else np.zeros((0, bins), np.float32)
            # h5py rejects a chunk larger than a zero-length dataset: an empty shard is contiguous.
            chunks = (min(len(feats), 4096), bins) if len(feats) else None
            h5.create_dataset("feats", data=feats, chunks=chunks)
            h5.create_dataset("offsets", data=offsets)
            h5.create_dataset("num_frames", data=lengths)
            h5.create_dataset("ids", data=[r[0] for r in self._rows], dtype=strings)
            h5.create_dataset("texts", data=[r[1] for r in self._rows], dtype=strings)
            h5.create_dataset("speakers", data=[r[2] for r in self._rows], dtype=strings)
            h5.create_dataset("durations", data=np.array([r[3] for r in self._rows], np.float32))
            h5.attrs["format"] = FORMAT
            h5.attrs["version"] = VERSION
            h5.attrs["features"] = json.dumps(asdict(self.features))
            for k, v in self.meta.items():
                h5.attrs[k] = v
        os.replace(tmp, self.path)
        return {"file": self.path.name, "utterances": len(lengths), "frames": int(lengths.sum())}


def read_index(directory: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``index.json`` of a prepared feature directory."""
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature index (run data_prep.fbank first)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {index.get('format')!r} v{index.get('version')}, expected {FORMAT!r} v{VERSION}"
        )
    for shard in index["shards"]:
        if not (Path(directory) / shard["file"]).is_file():
            raise FileNotFoundError(f"{Path(directory) / shard['file']}: shard listed in index.json is missing")
    return index
