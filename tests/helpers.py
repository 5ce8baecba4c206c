"""Tiny prepared feature sets for unit tests, written straight to HDF5 shards (no audio).

Each character owns a fixed random 80-dim pattern held for a few frames, with silence around
the utterance, so a small Conformer-CTC can learn (and overfit) the mapping in seconds. The
patterns depend only on the character, never on ``seed``: a train and a dev directory built
with different seeds describe the same "language".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_asr.config import FeatureConfig
from hpc_asr.data.shards import ShardWriter, write_index
from hpc_asr.data.tokenizer import DEFAULT_SYMBOLS, normalize

__all__ = ["TEXTS", "char_patterns", "make_feature_dir", "rescored", "tiny_features", "tiny_yaml", "untrained_cer"]

TEXTS = ["yes", "no", "stop", "go home", "play jazz", "call bob", "turn it up", "set a timer",
         "what time", "lights off", "open door", "quiet"]
FRAMES_PER_CHAR = 8  # 2 output frames per character after 4x subsampling: room for CTC blanks
SILENCE_FRAMES = 6


def char_patterns(num_bins: int = 80) -> dict[str, np.ndarray]:
    """One log-mel-like pattern per symbol; the word gap (space) looks like silence plus a bump."""
    rng = np.random.default_rng(1234)
    return {c: (4.0 + 3.0 * rng.standard_normal(num_bins)).astype(np.float32) for c in DEFAULT_SYMBOLS}


def _utterance(text: str, rng: np.random.Generator, patterns: dict[str, np.ndarray]) -> np.ndarray:
    bins = next(iter(patterns.values())).shape[0]
    silence = np.zeros(bins, np.float32)
    parts = [np.tile(silence, (SILENCE_FRAMES + int(rng.integers(0, 3)), 1))]
    for c in normalize(text):
        hold = FRAMES_PER_CHAR + int(rng.integers(-1, 2))  # jitter so durations are not a lookup
        parts.append(np.tile(patterns[c], (hold, 1)))
    parts.append(np.tile(silence, (SILENCE_FRAMES + int(rng.integers(0, 3)), 1)))
    feats = np.concatenate(parts)
    return feats + 0.3 * rng.standard_normal(feats.shape).astype(np.float32)


def make_feature_dir(path: str | Path, n_utts: int, texts: list[str] | None = None, seed: int = 0,
                     shards: int = 2) -> Path:
    """Write ``n_utts`` utterances (texts cycled) over ``shards`` HDF5 shards plus the same
    index.json that ``data_prep.fbank`` writes; returns the directory."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(texts or TEXTS)
    features = FeatureConfig()
    patterns = char_patterns(features.num_mel_bins)
    rng = np.random.default_rng(seed)
    writers = [ShardWriter(out / f"shard-{r:05d}.h5", features, {"rank": r, "size": shards})
               for r in range(shards)]
    total, total_sq, count = np.zeros(features.num_mel_bins), np.zeros(features.num_mel_bins), 0
    for i in range(n_utts):
        feats = _utterance(texts[i % len(texts)], rng, patterns)
        duration = len(feats) * features.frame_shift_ms / 1000
        writers[i % shards].add(f"utt{seed}_{i:04d}", feats, texts[i % len(texts)], f"spk{i % 3}", duration)
        total += feats.sum(0, dtype=np.float64)
        total_sq += (feats.astype(np.float64) ** 2).sum(0)
        count += len(feats)
    rows = [w.close() for w in writers]
    write_index(out, features, rows, (total, total_sq, count), fingerprint=f"synthetic-{seed}",
                manifest="synthetic", ranks=shards, wall_s=0.0)  # the same builder data_prep.fbank uses
    return out


def tiny_yaml(path: Path, train_dir: Path, dev_dir: Path, out_dir: Path, **sections) -> Path:
    """A config small enough for 2 ranks on a 2-core box; ``sections`` override whole keys."""
    cfg = {
        "data": {"train": str(train_dir), "dev": str(dev_dir), "test": str(dev_dir),
                 "max_frames": 2000, "max_utts": 2},
        "specaug": {"enabled": False},
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "ff_mult": 2, "conv_kernel": 5,
                  "subsample_channels": 8, "dropout": 0.0},
        "train": {"out_dir": str(out_dir), "epochs": 1, "lr": 1e-3, "warmup_steps": 2,
                  "log_every": 1, "threads": 1},
        "dist": {"engine": "horovod", "compression": "fp16"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory) -> dict[str, Path]:
    """{'train': 8 utterances over 2 shards, 'dev': 4 utterances in 1 shard}."""
    root = tmp_path_factory.mktemp("tiny_feats")
    return {"train": make_feature_dir(root / "train", 8, TEXTS, seed=0, shards=2),
            "dev": make_feature_dir(root / "dev", 4, TEXTS[4:], seed=1, shards=1)}


def rescored(eval_json: Path) -> tuple[float, float]:
    """(WER, CER) recomputed from the hypotheses an evaluation wrote, to check the figures it reports."""
    from hpc_asr.decode.wer import error_counts, rates

    pairs = json.loads(Path(eval_json).read_text())["hypotheses"].values()
    return rates(error_counts([p["ref"] for p in pairs], [p["hyp"] for p in pairs]))


def untrained_cer(ckpt: Path, data_dir: Path) -> float:
    """Greedy CER on ``data_dir`` of a freshly initialised model with ``ckpt``'s configuration: the
    baseline a trained model must beat."""
    import torch

    from hpc_asr import checkpoint
    from hpc_asr.data.loader import FeatureSet
    from hpc_asr.decode.evaluate import evaluate
    from hpc_asr.dist.engines import Engine
    from hpc_asr.dist.launch import World
    from hpc_asr.model import ConformerCTC

    _, tok, cfg = checkpoint.load_model(ckpt)
    data = FeatureSet(data_dir)
    torch.manual_seed(cfg.train.seed)
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    model.set_cmvn(data.cmvn_mean, data.cmvn_std)
    return evaluate(model, data, tok, Engine(World()), cfg)["cer"]


def wait_file(path: Path, proc, timeout: float = 180) -> str:
    """The text of ``path`` once the subprocess ``proc`` has written it (a rank's pause marker);
    fails with the process's output if it exits first, or after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before {path.name}\n{out}\n{err}")
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()
