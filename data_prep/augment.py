"""Waveform augmentation before feature prep, the way Kaldi recipes do it: write augmented copies
of the training audio and a combined manifest, then run ``data_prep.fbank`` on that manifest.

    python -m hpc_asr prep augment --manifest data/va/train.jsonl --out data/va/aug --config demo.yaml
    mpirun -np 2 python -m hpc_asr prep augment ...      # rank r renders utterances i % size == r

Each copy draws, from the ``augment`` config section (each part switches off on its own):

* speed perturbation (Ko et al., 2015): resampling by 0.9/1.0/1.1 changes tempo and pitch;
* additive noise at a random SNR: white, pink or brown noise generated here, or babble summed
  from other training utterances;
* reverberation: convolution with a room impulse response simulated by pyroomacoustics'
  image-source method in a random shoebox room (RT60 drawn from a range), aligned on the direct
  path so words do not shift.

Everything is drawn from ``augment.seed`` and the utterance's position, so the copies do not depend
on the number of ranks. Lengths are kept (speed changes them by the factor, as it must), the
sample rate and the sample format (e.g. 16-bit PCM) are those of the input. With
``augment.enabled: false`` the combined manifest is the input's utterances only.

Layout under OUT: ``wav/<id>-aug<k>.wav``, ``train.jsonl`` (originals + copies; audio paths
relative to OUT) and ``augment.json`` (what was done; a re-run with the same inputs is a no-op).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from hpc_asr.atomic import write_json_atomic
from hpc_asr.cli import load_config
from hpc_asr.config import AugmentConfig, ConfigError
from hpc_asr.data.features import AudioError, resample
from hpc_asr.data.manifest import ManifestError, Utterance, read_manifest, write_manifest
from hpc_asr.dist.launch import detect_world, mpi_comm

__all__ = ["add_noise", "augment_one", "coloured_noise", "main", "reverberate", "rir_bank", "speed_perturb"]

RIR_MAX_ORDER = 40  # image-source reflections; enough for RT60 <= 0.7 s in a room (measured)


def _read(path: str) -> tuple[np.ndarray, int, str]:
    """(float32 mono samples, rate, soundfile subtype) of one file."""
    import soundfile as sf

    x, rate = sf.read(path, dtype="float32", always_2d=True)
    return x.mean(axis=1), rate, sf.info(path).subtype


def speed_perturb(x: np.ndarray, factor: float, rate: int) -> np.ndarray:
    """Play ``x`` ``factor`` times faster (tempo and pitch, like sox ``speed``): ``len / factor``
    samples at the same rate."""
    if factor == 1.0:
        return x
    return resample(x, rate, rate / factor, "speed perturbation")[: round(len(x) / factor)]


def coloured_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with power spectrum 1/f^a: white a=0, pink a=1, brown a=2."""
    alpha = {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind]
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    y = np.fft.irfft(spec / f ** (alpha / 2), n)
    return (y / max(float(np.sqrt(np.mean(y**2))), 1e-12)).astype(np.float32)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``x`` plus ``noise`` scaled to ``snr_db`` below the signal's power (same length as ``x``)."""
    p_sig = float(np.mean(x.astype(np.float64) ** 2))
    p_noise = max(float(np.mean(noise.astype(np.float64) ** 2)), 1e-20)
    return (x + noise * np.sqrt(p_sig / p_noise / 10 ** (snr_db / 10))).astype(np.float32)


def _babble(n: int, others: list[Utterance], k: int, rng: np.random.Generator, rate: int) -> np.ndarray:
    """Sum of ``k`` other utterances, each looped to ``n`` samples at a random offset."""
    out = np.zeros(n, np.float32)
    for i in rng.choice(len(others), size=min(k, len(others)), replace=False):
        y, r, _ = _read(others[int(i)].audio)
        if r != rate or not len(y):
            continue
        y = np.resize(np.roll(y, int(rng.integers(len(y)))), n)
        out += y / max(float(np.sqrt(np.mean(y**2))), 1e-9)
    return out


def rir_bank(cfg: AugmentConfig, rate: int) -> list[np.ndarray]:
    """``cfg.rirs`` room impulse responses of random shoebox rooms (3-10 m x 3-8 m x 2.5-4 m),
    RT60 in [rt60_min, rt60_max], source and microphone at random places; seeded by cfg.seed."""
    import pyroomacoustics as pra

    rng = np.random.default_rng([cfg.seed, 7919])
    bank = []
    while len(bank) < cfg.rirs:
        dim = rng.uniform([3.0, 3.0, 2.5], [10.0, 8.0, 4.0])
        rt60 = rng.uniform(cfg.rt60_min, cfg.rt60_max)
        try:
            absorption, order = pra.inverse_sabine(rt60, dim)
        except ValueError:  # the room is too large for so short a reverberation
            continue
        room = pra.ShoeBox(dim, fs=rate, materials=pra.Material(absorption), max_order=min(order, RIR_MAX_ORDER))
        room.add_source(rng.uniform(0.5, dim - 0.5))
        room.add_microphone(rng.uniform(0.5, dim - 0.5))
        room.compute_rir()
        bank.append(np.asarray(room.rir[0][0], np.float32))
    return bank


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``x`` convolved with ``rir``, aligned on the direct path (the RIR's peak) and cut to
    ``len(x)``, at the input's peak level."""
    from scipy.signal import fftconvolve

    d = int(np.argmax(np.abs(rir)))
    y = fftconvolve(x, rir)[d : d + len(x)]
    peak_in, peak_out = float(np.max(np.abs(x), initial=0)), float(np.max(np.abs(y), initial=0))
    return (y * (peak_in / peak_out if peak_out > 0 else 1.0)).astype(np.float32)


def augment_one(x: np.ndarray, rate: int, cfg: AugmentConfig, rng: np.random.Generator,
                rirs: list[np.ndarray], others: list[Utterance]) -> tuple[np.ndarray, dict]:
    """One augmented copy of ``x`` and what was applied."""
    done: dict = {}
    speeds = [float(s) for s in cfg.speeds.split(",") if s.strip()]
    if speeds:
        done["speed"] = float(rng.choice(speeds))
        x = speed_perturb(x, done["speed"], rate)
    if rirs and rng.random() < cfg.reverb_prob:
        done["rir"] = int(rng.integers(len(rirs)))
        x = reverberate(x, rirs[done["rir"]])
    kinds = [k for k in cfg.noise_types.split(",") if k and (k != "babble" or others)]
    if kinds and rng.random() < cfg.noise_prob:
        kind = str(rng.choice(kinds))
        done.update(noise=kind, snr_db=round(float(rng.uniform(cfg.snr_db_min, cfg.snr_db_max)), 1))
        noise = (_babble(len(x), others, cfg.babble_speakers, rng, rate) if kind == "babble"
                 else coloured_noise(len(x), kind, rng))
        x = add_noise(x, noise, done["snr_db"])
    return np.clip(x, -1.0, 1.0).astype(np.float32), done


def _render(i: int, u: Utterance, utts: list[Utterance], cfg: AugmentConfig, rirs, out: Path) -> list[dict]:
    """Copies of utterance ``i``; a file that cannot be read becomes an error row."""
    import soundfile as sf

    try:
        x, rate, subtype = _read(u.audio)
    except (OSError, RuntimeError, ValueError) as e:
        return [{"id": u.id, "error": f"{u.audio}: unreadable ({str(e).splitlines()[0]})"}]
    rows = []
    for k in range(cfg.copies):
        rng = np.random.default_rng([cfg.seed, i, k])
        others = [utts[j] for j in rng.choice(len(utts), size=min(len(utts), 4 * cfg.babble_speakers + 1),
                                               replace=False) if j != i]
        try:
            y, done = augment_one(x, rate, cfg, rng, rirs, others)
        except (OSError, RuntimeError, ValueError, AudioError) as e:
            rows.append({"id": u.id, "error": f"augment copy {k}: {str(e).splitlines()[0]}"})
            continue
        rel = Path("wav") / f"{u.id}-aug{k}.wav"
        sf.write(out / rel, y, rate, subtype=subtype)
        rows.append({"id": f"{u.id}-aug{k}", "audio": rel.as_posix(), "text": u.text,
                     "duration": round(len(y) / rate, 4), "speaker": u.speaker, "engine": u.engine,
                     "voice": u.voice, "aug": done})
    return rows


def _fingerprint(manifest: Path, cfg: AugmentConfig) -> str:
    h = hashlib.sha256(manifest.read_bytes())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    return h.hexdigest()[:16]


def run(manifest: Path, out: Path, cfg: AugmentConfig, world, comm) -> dict:
    """Every rank renders its share; rank 0 writes the combined manifest and summary."""
    utts = read_manifest(manifest)
    fp = _fingerprint(manifest, cfg)
    summary_path = out / "augment.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("fingerprint") == fp \
            and (out / "train.jsonl").is_file():
        return json.loads(summary_path.read_text()) | {"up_to_date": True}
    (out / "wav").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    on = cfg.enabled and cfg.copies > 0
    rirs = rir_bank(cfg, _read(utts[0].audio)[1]) if on and cfg.reverb_prob > 0 and utts else []
    mine = [r for i in range(world.rank, len(utts), world.size) for r in _render(i, utts[i], utts, cfg, rirs, out)] \
        if on else []
    parts = [mine] if comm is None else comm.gather(mine, root=0)  # dist: rank 0 collects the rows
    if world.rank != 0:
        return {}
    rows = [r for p in parts for r in p]
    failed = [r for r in rows if "error" in r]
    copies = sorted((r for r in rows if "error" not in r), key=lambda r: r["id"])
    originals = [replace(u, audio=os.path.relpath(u.audio, out.resolve())) for u in utts]
    write_manifest(out / "train.jsonl", originals + [Utterance(r["id"], r["audio"], r["text"], r["duration"],
                                                               r["speaker"], r["engine"], r["voice"]) for r in copies])
    summary = {"fingerprint": fp, "manifest": str(manifest), "config": asdict(cfg), "originals": len(utts),
               "copies": len(copies), "failed": failed, "rirs": len(rirs), "wall_s": round(time.time() - t0, 1),
               "applied": [{"id": r["id"], **r["aug"]} for r in copies]}
    write_json_atomic(summary_path, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpc-asr prep augment", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, type=Path, help="training manifest (JSONL)")
    p.add_argument("--out", required=True, type=Path, help="folder for wav/, train.jsonl, augment.json")
    p.add_argument("--config", help="YAML config; its augment section is used")
    args, rest = p.parse_known_args(argv)
    world = detect_world()
    try:
        cfg = load_config(args.config, rest).augment
        comm = mpi_comm() if world.size > 1 else None
        res = run(args.manifest, args.out, cfg, world, comm)
    except (ConfigError, ManifestError, OSError, AudioError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if world.rank == 0:
        state = "up to date" if res.get("up_to_date") else f"{res['copies']} copies, {len(res['failed'])} failed"
        print(f"[augment] {args.out}/train.jsonl: {res['originals']} originals, {state}, {res['wall_s']} s",
              file=sys.stderr)
        for f in res["failed"][:20]:
            print(f"[augment] skipped {f['id']}: {f['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
