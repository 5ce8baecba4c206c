"""The peer recognizer: PocketSphinx's generic US-English model and LM (shipped in its wheel),
scored on the same manifest and with the same normaliser and WER as ``hpc_asr.decode.evaluate``.

    [mpirun -np N] python -m hpc_asr bench peer --manifest data/va/test.jsonl --out runs/demo/peer_test.json

Each rank decodes every N-th utterance on one thread; rank 0 sums the error counts and the
decoding time. ``rtf`` is decoding seconds per audio second on one thread, the figure
``hpc_asr.bench.latency`` reports for our model. The demo report prints it beside ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from hpc_asr.atomic import write_json_atomic
from hpc_asr.data.features import AudioError, load_audio
from hpc_asr.data.manifest import ManifestError, read_manifest
from hpc_asr.data.text import normalize
from hpc_asr.decode.wer import COUNT_KEYS, error_counts, rates
from hpc_asr.dist.launch import detect_world, mpi_comm

__all__ = ["PEER", "decode_all", "main"]

PEER = "pocketsphinx en-us (generic acoustic model + LM from its wheel)"
SAMPLE_RATE = 16000


def _decoder():
    from pocketsphinx import Decoder

    return Decoder(samprate=SAMPLE_RATE, logfn="/dev/null")


def decode(decoder, samples: np.ndarray) -> str:
    """One utterance, float samples in [-1, 1] at 16 kHz → normalised text."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    decoder.start_utt()
    decoder.process_raw(pcm, no_search=False, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return normalize(hyp.hypstr if hyp is not None else "")


def decode_all(manifest: str | Path, rank: int = 0, size: int = 1, limit: int = 0) -> dict:
    """This rank's share: error counts, audio and decoding seconds, rows, unreadable files."""
    utts = read_manifest(manifest)[: limit or None][rank::size]
    decoder = _decoder()
    counts, rows, skipped = dict.fromkeys(COUNT_KEYS, 0), [], []
    audio_s = decode_s = 0.0
    for u in utts:
        try:
            x = load_audio(u.audio, SAMPLE_RATE, convert=True)
        except AudioError as e:
            skipped.append(f"{u.audio}: {e}")
            continue
        t0 = time.perf_counter()
        hyp = decode(decoder, x)
        decode_s += time.perf_counter() - t0
        audio_s += len(x) / SAMPLE_RATE
        ref = normalize(u.text)
        for k, v in error_counts([ref], [hyp]).items():
            counts[k] += v
        rows.append({"id": u.id, "ref": ref, "hyp": hyp})
    return {"counts": counts, "audio_s": audio_s, "decode_s": decode_s, "rows": rows, "skipped": skipped}


def merge(parts: list[dict], manifest: str) -> dict:
    counts = {k: sum(p["counts"][k] for p in parts) for k in COUNT_KEYS}
    wer, cer = rates(counts)
    audio_s, decode_s = sum(p["audio_s"] for p in parts), sum(p["decode_s"] for p in parts)
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["id"])
    return {"peer": PEER, "manifest": manifest, "utterances": len(rows), "wer": wer, "cer": cer, **counts,
            "audio_s": round(audio_s, 2), "rtf": round(decode_s / audio_s, 4) if audio_s else None,
            "threads": 1, "skipped": [s for p in parts for s in p["skipped"]], "hypotheses": rows}


def _up_to_date(out: Path, manifest: str, limit: int) -> bool:
    """A rerun of the demo skips the peer when its result is newer than the manifest."""
    try:
        res = json.loads(out.read_text())
        return (out.stat().st_mtime >= Path(manifest).stat().st_mtime and res.get("manifest") == manifest
                and res.get("limit", 0) == limit)
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--limit", type=int, default=0, help="only the first N utterances (0: all)")
    a = ap.parse_args(argv)
    world = detect_world()
    if _up_to_date(a.out, a.manifest, a.limit):
        if world.is_main:
            print(f"peer: {a.out} is up to date (newer than {a.manifest})")
        return 0
    try:
        mine = decode_all(a.manifest, world.rank, world.size, a.limit)
    except (ManifestError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: pocketsphinx is not installed (pip install pocketsphinx; make setup installs it)",
              file=sys.stderr)
        return 2
    parts = [mine] if world.size == 1 else mpi_comm().gather(mine, root=0)  # dist: rank 0 collects
    if world.is_main:
        res = {**merge(parts, a.manifest), "limit": a.limit}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(a.out, res)
        for s in res["skipped"]:
            print(f"skipped {s}", file=sys.stderr)
        print(f"peer {PEER}: WER {res['wer']:.2%} on {res['utterances']} utterances of {a.manifest}, "
              f"RTF {res['rtf']} (1 thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
