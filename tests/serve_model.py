"""A tiny real-audio model for the service tests: espeak-ng speech of a few commands, FBANK as
prep computes it, a small Conformer-CTC overfitted on it in well under a minute, then the real
``hpc-asr export`` (parity gate, model.json, the LM beside it). It recognises its own utterances,
so a transcript through the service can be compared with the offline Recognizer's, and it is
small enough to build once per test session (and for a first ``make bench-serve``).
``build(root, streaming=True)`` trains the same model with ``model.streaming`` on (causal
convolution, chunked attention), so the export also holds ``streaming.onnx``.

    python tests/serve_model.py OUT_DIR [--streaming]    # OUT_DIR/export + OUT_DIR/audio/*.wav
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hpc_asr.config import FeatureConfig  # noqa: E402
from hpc_asr.data.features import CmvnStats, fbank, load_audio  # noqa: E402

__all__ = ["SENTENCES", "STREAMING", "VOICES", "build", "cache_dir", "synth"]

SENTENCES = ["turn on the lights", "set a timer for ten minutes", "play some jazz", "what is the weather today",
             "call mom", "stop the music"]
VOICES = [("en-us", 160), ("en-gb", 175), ("en-us", 185)]
NOISE_FLOOR = 3e-3  # a microphone's hiss: digital silence would make dithered front ends (sherpa) see noise only
FEATURES = FeatureConfig(high_freq=-1000.0)  # mel banks to 7 kHz: a browser's 48 kHz path cuts the band above
# The streaming variant: chunks of 4 output frames (160 ms of audio), 4 chunks of left context
STREAMING = ["--model.streaming", "true", "--model.chunk_size", "4", "--model.left_chunks", "4",
             "--model.max_train_chunk", "8"]


def synth(text: str, voice: str, speed: int, out: Path, seed: int = 0) -> np.ndarray:
    """espeak-ng speech at 16 kHz between stretches of silence of random length (a client may
    start early and stop late, and a stream's partials see long silent tails), with a low noise
    floor. Written to ``out`` (16-bit WAV) and returned as float32 samples."""
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True,
                       capture_output=True)
        x = load_audio(str(raw), 16000, convert=True)
    rng = np.random.default_rng(seed)
    lead, tail = rng.uniform(0.1, 0.8), rng.uniform(0.2, 3.0)
    x = np.concatenate([np.zeros(int(lead * 16000), np.float32), 0.7 * x / max(1e-3, np.abs(x).max()),
                        np.zeros(int(tail * 16000), np.float32)])
    x = x + NOISE_FLOOR * rng.standard_normal(len(x)).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), x, 16000, subtype="PCM_16")
    return sf.read(str(out), dtype="float32")[0]


def _write_features(audio: list[tuple[str, np.ndarray, str]], out: Path, features: FeatureConfig) -> None:
    from hpc_asr.data.shards import ShardWriter, write_index

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out / "shard-00000.h5", features, {"rank": 0, "size": 1})
    stats = CmvnStats.zeros(features.num_mel_bins)
    for uid, x, text in audio:
        f = fbank(x, features)
        writer.add(uid, f, text, "espeak", len(x) / features.sample_rate)
        stats.add(f)
    write_index(out, features, [writer.close()], (stats.sum, stats.sumsq, stats.count), fingerprint="serve-tests",
                manifest="espeak", ranks=1, wall_s=0.0)


def _train(feat_dir: Path, ckpt: Path, steps: int, seed: int = 0, extra: tuple[str, ...] = ()) -> float:
    """Overfit a small Conformer-CTC on every utterance of ``feat_dir`` (one full batch per step);
    returns the last loss."""
    import torch

    from hpc_asr import checkpoint
    from hpc_asr.cli import load_config
    from hpc_asr.data.loader import FeatureSet
    from hpc_asr.data.tokenizer import CharTokenizer
    from hpc_asr.model import ConformerCTC

    cfg = load_config(None, ["--model.d_model", "64", "--model.n_heads", "2", "--model.n_layers", "2",
                             "--model.ff_mult", "2", "--model.conv_kernel", "7", "--model.subsampling", "conv1d",
                             "--model.subsample_factor", "4", "--model.dropout", "0.0",
                             "--features.high_freq", str(FEATURES.high_freq), *extra])
    tok = CharTokenizer()
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(seed)
    data = FeatureSet(feat_dir)
    model = ConformerCTC(cfg.model, cfg.features.num_mel_bins)
    model.set_cmvn(data.cmvn_mean, data.cmvn_std)
    feats = [torch.from_numpy(data.feats(i)) for i in range(len(data))]
    lens = torch.tensor([len(f) for f in feats])
    targets = [torch.tensor(tok.encode(data.texts[i])) for i in range(len(data))]
    tlens = torch.tensor([len(t) for t in targets])
    y = torch.cat(targets)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ctc = torch.nn.CTCLoss(blank=tok.blank, zero_infinity=True)
    model.train()
    loss = torch.tensor(0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # Each step drops 0-7 leading frames per utterance: the 4x subsampling sees every phase, so
        # audio that starts a few ms earlier or later (a browser's capture) decodes the same.
        cut = torch.randint(0, 8, (len(feats),), generator=gen).tolist()
        x = torch.nn.utils.rnn.pad_sequence([f[c:] for f, c in zip(feats, cut)], batch_first=True)
        lp, olens = model(x, lens - torch.tensor(cut))
        loss = ctc(lp.transpose(0, 1), y, olens, tlens)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    model.eval()
    checkpoint.save(ckpt, {"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": tok.state_dict()})
    return float(loss)


def cache_dir(streaming: bool = False) -> Path:
    """~/.cache/hpc_asr/serve-model[-streaming]-<hash of this file>: the build is deterministic, so it is kept."""
    import hashlib

    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    name = f"serve-model-streaming-{digest}" if streaming else f"serve-model-{digest}"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpc_asr" / name


def build(root: Path, steps: int = 250, streaming: bool = False) -> dict:
    """Audio under ``root/audio`` (and ``root/audio.jsonl``, a manifest for ``hpc-asr bench serve``),
    the export under ``root/export`` (with ``streaming.onnx`` when ``streaming``); returns {"export",
    "audio": {uid: (wav path, text)}, "loss", "wall_s"}. Reused when ``root/build.json`` exists."""
    root = Path(root)
    audio_dir, export_dir = root / "audio", root / "export"
    meta_path = root / "build.json"
    if (export_dir / "model.onnx").is_file() and meta_path.is_file():
        return _absolute(json.loads(meta_path.read_text()), root)
    t0 = time.time()
    audio, index = [], {}
    for s, text in enumerate(SENTENCES):
        for v, (voice, speed) in enumerate(VOICES):
            uid = f"s{s}v{v}"
            wav = audio_dir / f"{uid}.wav"
            audio.append((uid, synth(text, voice, speed, wav, seed=s * 10 + v), text))
            index[uid] = [str(wav), text]
    _write_features(audio, root / "fbank", FEATURES)
    from hpc_asr.data.manifest import Utterance, write_manifest

    write_manifest(root / "audio.jsonl", [Utterance(uid, f"audio/{uid}.wav", text, len(x) / 16000, "espeak")
                                          for uid, x, text in audio])  # relative: the cache can move
    from hpc_asr.decode.ngram import build_arpa

    build_arpa(SENTENCES, 2, root / "ckpt" / "lm" / "lm.arpa")
    loss = _train(root / "fbank", root / "ckpt" / "last.pt", steps, extra=tuple(STREAMING) * streaming)
    subprocess.run([sys.executable, "-m", "hpc_asr", "export", "--checkpoint", str(root / "ckpt" / "last.pt"),
                    "--data", str(root / "fbank"), "--out-dir", str(export_dir)], check=True, cwd=ROOT,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    meta = {"export": "export", "audio": {k: [str(Path(w).relative_to(root)), t] for k, (w, t) in index.items()},
            "loss": loss, "wall_s": round(time.time() - t0, 1)}
    meta_path.write_text(json.dumps(meta, indent=1))  # paths relative to root: the cache can move
    return _absolute(meta, root)


def _absolute(meta: dict, root: Path) -> dict:
    return {**meta, "export": str(root / meta["export"]),
            "audio": {k: [str(root / w), t] for k, (w, t) in meta["audio"].items()}}


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1]), streaming="--streaming" in sys.argv[2:]), indent=1))
