"""The on-disk feature format: bounded-size HDF5 shards plus ``index.json``. This module is the
only writer and reader of both, and of the checks ``data_prep.verify`` runs.

Why this shape: on Lustre, many ranks writing one HDF5 file needs parallel HDF5 and file locks
that many sites disable. One file per writer needs neither. A shard is streamed to a temporary
name as utterances arrive (memory holds ~8 MB of frames, not one shard) and renamed when it reaches
its size cap, so a killed job never leaves a half-written shard that looks complete. Each shard
stores its frames in one contiguous 2-D dataset (fast sequential reads, few metadata ops) with
per-utterance offsets, and a checksum of those frames that the index repeats.

Shard datasets: ``feats`` (frames, bins) float32, ``offsets`` int64, ``num_frames`` int32,
``ids``/``texts``/``speakers`` utf-8 strings, ``durations`` float32, plus what the writer
attaches with ``set_extra`` (the prep stores its work units, CMVN sums and rejects there).
Attributes: ``format``, ``version``, ``features`` (JSON of FeatureConfig), ``checksum``,
``utterances``, ``frames``.

``index.json`` (written last, atomically; its presence means the directory is complete):
``format``, ``version``, ``features``, ``shards`` (rows: ``file`` relative to the directory,
``utterances``, ``frames``, ``bytes``, ``checksum``), ``utterances``, ``frames``, ``hours``,
``cmvn`` (``mean``, ``std``, ``frames``), ``rejected`` and whatever the writer adds.
"""

from __future__ import annotations

import contextlib
import json
import sys
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_asr.atomic import AtomicFile, write_json_atomic
from hpc_asr.config import FeatureConfig
from hpc_asr.data.features import CmvnStats  # the one CMVN rule (std floor included)

__all__ = ["FORMAT", "VERSION", "ShardError", "ShardWriter", "check_shard", "open_h5", "open_shard",
           "read_index", "verify_hint", "write_index"]

FORMAT = "hpc_asr.fbank"
VERSION = 2
DEFAULT_MAX_BYTES = 1 << 30  # ~1 GiB: large sequential files suit Lustre; ~9 h of 80-bin FBANK
_BLOCK = 1 << 18  # frames per read when checksumming (~80 MB)
_WRITE_BLOCK = 8 << 20  # bytes of frames buffered before one HDF5 write (bounds memory, not shards)


class ShardError(ValueError):
    """A shard cannot be read or disagrees with the index; the message names the file."""


def open_h5(path: str | Path, mode: str = "r"):
    """Open HDF5 without file locking: shards are single-writer by construction, and Lustre/NFS
    mounts without flock make HDF5's own locking fail with 'unable to lock file'."""
    return h5py.File(path, mode, locking=False)


def verify_hint(shard: Path) -> str:
    """The command that checks the directory a shard belongs to: the one holding index.json (the
    shard's own directory, or its parent when the shard sits in a generation subdirectory)."""
    directory = next((d for d in shard.parents[:2] if (d / "index.json").is_file()), shard.parent)
    return f"run `python -m hpc_asr prep verify {directory}`"


def open_shard(path: str | Path):
    """Open a shard for reading; a truncated or corrupt file raises ShardError in one line."""
    path = Path(path)
    try:
        h5 = open_h5(path)
        h5["feats"], h5["offsets"], h5["num_frames"]  # touch the datasets reads need
    except (OSError, KeyError) as e:
        raise ShardError(f"{path}: unreadable shard ({str(e).splitlines()[0]}); {verify_hint(path)}") from None
    return h5


@contextlib.contextmanager
def _muted_unraisable():
    """h5py handles of a file whose write failed complain as they die, through both hooks."""
    hooks = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = (lambda *_: None), (lambda *_: None)
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = hooks


class _Crc32:
    """Running CRC-32 of the frames: catches truncation and bit rot, and at ~1 GB/s costs the
    prep little (a cryptographic hash measured 5x slower here)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"crc32:{self.value:08x}"


def _checksum() -> _Crc32:
    return _Crc32()


class ShardWriter:
    """Streams utterances into one shard under a temporary name; ``close()`` renames it.

    ``full`` turns true once the shard holds ``max_bytes`` of frames or ``max_utts`` utterances;
    the caller then closes it and starts the next (an utterance is never split across shards).
    """

    def __init__(self, path: str | Path, features: FeatureConfig, meta: dict[str, Any] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_utts: int = 0):
        self.path = Path(path)
        self.features = features
        self.meta = meta or {}
        self.max_bytes, self.max_utts = max_bytes, max_utts
        self._rows: list[tuple[str, str, str, float]] = []
        self._lengths: list[int] = []
        self._frames = self._written = self._pending_frames = 0
        self._buf = np.empty((0, features.num_mel_bins), np.float32)  # frames not yet written
        self._hash = _checksum()
        self._extra: dict[str, Any] = {}
        self._file = AtomicFile(self.path)  # streamed to a hidden temporary name, renamed at close
        self._h5 = self._ds = None

    def _open(self):
        bins = self.features.num_mel_bins
        self._h5 = open_h5(self._file.tmp, "w")
        # One handle for the shard's life: a handle dropped per write would flush (and fail) in __del__.
        self._ds = self._h5.create_dataset("feats", shape=(0, bins), maxshape=(None, bins), dtype=np.float32,
                                           chunks=(1024, bins))  # 320 KB chunks
        self._buf = np.empty((max(_WRITE_BLOCK // (4 * bins), 1), bins), np.float32)

    def add(self, utt_id: str, feats: np.ndarray, text: str, speaker: str, duration: float) -> None:
        if feats.ndim != 2 or feats.shape[1] != self.features.num_mel_bins:
            raise ValueError(f"{utt_id}: feats shape {feats.shape}, expected (T, {self.features.num_mel_bins})")
        if self._h5 is None:
            self._open()
        n, buf = len(feats), self._buf
        if self._pending_frames + n > len(buf):
            self._flush_pending()
        if n > len(buf):  # longer than the whole buffer: written as it is
            self._write(np.ascontiguousarray(feats, np.float32))
        else:  # copied into the reused buffer: no fresh block (and its page faults) per write
            buf[self._pending_frames : self._pending_frames + n] = feats
            self._pending_frames += n
        self._frames += n
        self._lengths.append(n)
        self._rows.append((utt_id, text, speaker, duration))

    def _flush_pending(self) -> None:
        """Append the buffered utterances (at most _WRITE_BLOCK bytes) to the shard in one write."""
        if self._pending_frames:
            self._write(self._buf[: self._pending_frames])
            self._pending_frames = 0

    def _write(self, block: np.ndarray) -> None:
        start = self._written
        try:
            self._ds.resize(start + len(block), axis=0)
            self._ds[start:] = block
        except Exception:  # disk full, quota: drop the file; h5py's dealloc complaints would bury the error
            self.abort()
            raise
        self._hash.update(block.data)
        self._written += len(block)

    def set_extra(self, name: str, data: Any) -> None:
        """Attach a dataset (numpy array or list of str) written at close."""
        self._extra[name] = data

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def frames(self) -> int:
        return self._frames

    @property
    def full(self) -> bool:
        nbytes = self._frames * self.features.num_mel_bins * 4
        return nbytes >= self.max_bytes or (self.max_utts > 0 and len(self) >= self.max_utts)

    def close(self) -> dict[str, Any]:
        """Finish the shard and rename it into place; returns its row for the index."""
        try:
            return self._finish()
        except Exception:
            self.abort()
            raise

    def _finish(self) -> dict[str, Any]:
        if self._h5 is None:
            self._open()
        self._flush_pending()
        h5, strings = self._h5, h5py.string_dtype("utf-8")
        lengths = np.array(self._lengths, np.int32)
        offsets = np.zeros(len(lengths), np.int64)
        if len(lengths):
            offsets[1:] = np.cumsum(lengths, dtype=np.int64)[:-1]
        h5.create_dataset("offsets", data=offsets)
        h5.create_dataset("num_frames", data=lengths)
        for k, col in (("ids", 0), ("texts", 1), ("speakers", 2)):
            h5.create_dataset(k, data=[r[col] for r in self._rows], dtype=strings)
        h5.create_dataset("durations", data=np.array([r[3] for r in self._rows], np.float32))
        for name, data in self._extra.items():
            is_str = isinstance(data, list)
            h5.create_dataset(name, data=data, dtype=strings if is_str else None)
        checksum = self._hash.hexdigest()
        attrs = {"format": FORMAT, "version": VERSION, "features": json.dumps(asdict(self.features)),
                 "checksum": checksum, "utterances": len(lengths), "frames": self._frames, **self.meta}
        for k, v in attrs.items():
            h5.attrs[k] = v
        h5.flush()  # a write error (disk full) surfaces here, not in a handle's __del__
        self._ds = None
        h5.close()
        self._h5 = None
        self._file.commit()
        return {"file": self.path.name, "utterances": len(lengths), "frames": self._frames,
                "bytes": self.path.stat().st_size, "checksum": checksum}

    def abort(self) -> None:
        """Drop the unfinished shard (after an error: closing may fail again, e.g. disk full)."""
        with _muted_unraisable():
            h5, self._h5, self._ds = self._h5, None, None
            with contextlib.suppress(Exception):
                if h5 is not None:
                    h5.close()
            del h5
        self._file.discard()


def write_index(directory: str | Path, features: FeatureConfig, shards: list[dict[str, Any]],
                cmvn_sums: tuple[np.ndarray, np.ndarray, int], **extra: Any) -> dict[str, Any]:
    """Build ``index.json`` from shard rows and CMVN sums (sum, sum of squares, frames); written
    atomically, so replacing it swaps a whole shard set at once."""
    total, total_sq, count = cmvn_sums
    if count == 0:
        raise ValueError(f"{directory}: CMVN over zero frames (no utterance was featurized)")
    mean, std = CmvnStats(np.asarray(total, np.float64), np.asarray(total_sq, np.float64), count).mean_std()
    frames = sum(s["frames"] for s in shards)
    index = {
        "format": FORMAT, "version": VERSION, "features": asdict(features), "shards": shards,
        "utterances": sum(s["utterances"] for s in shards), "frames": frames,
        "hours": round(frames * features.frame_shift_ms / 3.6e6, 4),
        "cmvn": {"mean": mean.tolist(), "std": std.tolist(),
                 "frames": int(count)},
        "rejected": 0, **extra,
    }
    write_json_atomic(Path(directory) / "index.json", index)
    return index


def read_index(directory: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``index.json`` of a prepared feature directory."""
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no feature index (run data_prep.fbank first)")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e}); rerun data_prep.fbank") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {index.get('format')!r} v{index.get('version')}, expected {FORMAT!r} v{VERSION}"
        )
    for shard in index["shards"]:
        if not (Path(directory) / shard["file"]).is_file():
            raise FileNotFoundError(f"{Path(directory) / shard['file']}: shard listed in index.json is missing")
    return index


def _frames_checksum(feats) -> tuple[str, bool]:
    """Checksum of a feats dataset read in blocks, and whether every value is finite."""
    h, finite = _checksum(), True
    for start in range(0, len(feats), _BLOCK):
        block = np.ascontiguousarray(feats[start : start + _BLOCK], np.float32)
        h.update(block.tobytes())
        finite = finite and bool(np.isfinite(block).all())
    return h.hexdigest(), finite


def check_shard(directory: str | Path, row: dict[str, Any], features: dict[str, Any]) -> str | None:
    """Compare one shard with its index row; returns the first problem, or None."""
    path = Path(directory) / row["file"]
    if "bytes" in row and path.stat().st_size != row["bytes"]:
        return f"{path}: {path.stat().st_size} bytes, index says {row['bytes']} (truncated or replaced)"
    try:
        with open_shard(path) as h5:
            attrs = dict(h5.attrs)
            if attrs.get("format") != FORMAT or attrs.get("version") != VERSION:
                return f"{path}: format {attrs.get('format')!r} v{attrs.get('version')}, expected v{VERSION}"
            if json.loads(attrs.get("features", "{}")) != features:
                return f"{path}: feature settings differ from index.json"
            lengths, offsets = h5["num_frames"][:], h5["offsets"][:]
            n, frames = len(lengths), int(lengths.sum())
            if n != row["utterances"] or len(h5["ids"]) != n or len(offsets) != n:
                return f"{path}: {n} utterances, index says {row['utterances']}"
            if frames != row["frames"] or len(h5["feats"]) != frames:
                return f"{path}: {len(h5['feats'])} frames, index says {row['frames']}"
            if n and (offsets[0] != 0 or (offsets[1:] != np.cumsum(lengths)[:-1]).any()):
                return f"{path}: offsets do not follow num_frames"
            checksum, finite = _frames_checksum(h5["feats"])
    except ShardError as e:
        return str(e)
    except OSError as e:
        return f"{path}: read error ({str(e).splitlines()[0]})"
    if not finite:
        return f"{path}: features contain NaN or Inf"
    if "checksum" in row and checksum != row["checksum"]:
        return f"{path}: checksum {checksum} != index {row['checksum']} (corrupt)"
    return None
