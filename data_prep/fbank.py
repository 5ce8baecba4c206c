"""Compute FBANK for a JSONL manifest across MPI ranks and write sharded HDF5 + index + CMVN.

    mpirun -np 2 python -m data_prep.fbank --manifest data/va/train.jsonl --out data/va/fbank/train

Each rank featurizes every size-th utterance (longest first, so ranks get equal audio), writes
``shard-RRRRR.h5`` atomically, and the per-rank CMVN sums are reduced over MPI. Rank 0 writes
``index.json`` last: its presence means the directory is complete. A utterance that fails to
decode is skipped, named on stderr and listed under ``skipped`` in the index; it costs nothing
else. Re-running with the same manifest and settings is a no-op unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hpc_asr.config import ConfigError, load_config
from hpc_asr.dist import World, detect_world, log0, mpi_comm
from hpc_asr.features import AudioError, CmvnStats, fbank, load_audio
from hpc_asr.manifest import ManifestError, read_manifest
from hpc_asr.shards import FORMAT, VERSION, ShardWriter, write_json_atomic


def _fingerprint(manifest: Path, features: dict) -> str:
    h = hashlib.sha1(manifest.read_bytes())
    h.update(json.dumps(features, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _up_to_date(out: Path, fingerprint: str) -> bool:
    index = out / "index.json"
    if not index.is_file():
        return False
    try:
        data = json.loads(index.read_text())
    except ValueError:
        return False
    return data.get("fingerprint") == fingerprint and all((out / s["file"]).is_file() for s in data["shards"])


def run(manifest: Path, out: Path, features, world: World, comm, force: bool = False) -> dict | None:
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest not found")
    fingerprint = _fingerprint(manifest, asdict(features))
    skip = _up_to_date(out, fingerprint) and not force
    if comm is not None:
        skip = comm.bcast(skip, root=0)  # every rank must take the same branch
    if skip:
        log0(world, f"[fbank] {out}/index.json up to date; nothing to do (--force to redo)")
        return None

    utts = read_manifest(manifest)
    # Longest first, dealt round-robin: balanced audio per rank, deterministic assignment.
    order = sorted(range(len(utts)), key=lambda i: (-utts[i].duration, utts[i].id))
    mine = [utts[i] for i in order[world.rank :: world.size]]
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(
        out / f"shard-{world.rank:05d}.h5", features, {"rank": world.rank, "size": world.size}
    )
    cmvn = CmvnStats.zeros(features.num_mel_bins)
    skipped, t0, next_report = [], time.time(), 0.1
    for n, u in enumerate(mine, 1):
        try:
            feats = fbank(load_audio(u.audio, features.sample_rate), features)
        except AudioError as e:
            print(f"[fbank] {world.tag} skipped {u.id} ({u.audio}): {e}", file=sys.stderr, flush=True)
            skipped.append({"id": u.id, "audio": u.audio, "error": str(e)})
            continue
        writer.add(u.id, feats, u.text, u.speaker, u.duration)
        cmvn.add(feats)
        if n / len(mine) >= next_report:
            log0(world, f"[fbank] rank 0: {n}/{len(mine)} utterances, {time.time() - t0:.1f}s")
            next_report = (int(n / len(mine) * 10) + 1) / 10
    shard = writer.close()

    gathered = [(shard, skipped, cmvn)] if comm is None else comm.gather((shard, skipped, cmvn), root=0)
    if world.rank != 0:
        comm.barrier()
        return None
    total = CmvnStats.zeros(features.num_mel_bins)
    for _, _, c in gathered:  # a gather+sum on rank 0 equals an allreduce here and keeps exact counts
        total.sum += c.sum
        total.sumsq += c.sumsq
        total.count += c.count
    if total.count == 0:
        print(f"error: {manifest}: no utterance could be featurized; see the skipped lines above", file=sys.stderr)
        if comm is not None:
            comm.Abort(1)
        raise SystemExit(1)
    mean, std = total.mean_std()
    shards = [g[0] for g in gathered]
    index = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "manifest": str(manifest.resolve()),
        "features": asdict(features),
        "shards": shards,
        "utterances": sum(s["utterances"] for s in shards),
        "frames": sum(s["frames"] for s in shards),
        "hours": round(sum(s["frames"] for s in shards) * features.frame_shift_ms / 3.6e6, 4),
        "cmvn": {"mean": mean.tolist(), "std": std.tolist(), "frames": int(total.count)},
        "skipped": [s for g in gathered for s in g[1]],
        "ranks": world.size,
        "wall_s": round(time.time() - t0, 2),
    }
    write_json_atomic(out / "index.json", index)
    if comm is not None:
        comm.barrier()
    log0(
        world,
        f"[fbank] wrote {out}: {index['utterances']} utterances, {index['hours']:.2f} h, "
        f"{len(shards)} shards, {len(index['skipped'])} skipped, {index['wall_s']}s",
    )
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, type=Path, help="JSONL: id, audio, duration, text, speaker")
    p.add_argument("--out", required=True, type=Path, help="output directory for shards + index.json")
    p.add_argument("--config", help="YAML config; only its features section is used")
    p.add_argument("--force", action="store_true", help="recompute even if index.json is up to date")
    args, rest = p.parse_known_args(argv)
    try:
        features = load_config(args.config, rest).features
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = detect_world()
    comm = mpi_comm() if world.size > 1 else None
    if comm is not None:
        world = World(comm.Get_rank(), comm.Get_size(), world.local_rank, world.local_size)
    try:
        run(args.manifest, args.out, features, world, comm, args.force)
    except (ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        if comm is not None:
            comm.Abort(2)  # other ranks would wait forever in gather
        return 2
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
