"""Measure CPU inference latency of the exported ONNX model on real utterances.

    hpc-asr latency --model-dir runs/demo/export --manifest data/va/test.jsonl \
        --out runs/demo/latency.json

Each utterance is timed end to end as a voice assistant would run it, one request at a time:
waveform → FBANK → ONNX Runtime → CTC decoding (``--decoder greedy|beam|beam+lm``; the LM is
``<model-dir>/lm`` unless ``--lm`` names one). Audio decoding from disk is excluded (a server
receives samples). Reports p50/p95/max latency in ms and the real-time factor (processing time
/ audio time) with the FBANK and network shares separated.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from hpc_asr.atomic import write_json_atomic
from hpc_asr.data.features import load_audio
from hpc_asr.data.manifest import read_manifest
from hpc_asr.decode.ctc import DECODERS
from hpc_asr.deploy.recognizer import Recognizer

__all__ = ["main", "measure"]


def measure(rec: Recognizer, waves: list[np.ndarray], warmup: int = 3) -> dict:
    for w in waves[:warmup]:  # first runs pay for allocator and kernel selection
        rec(w)
    total, feat_t, net_t, audio_s = [], 0.0, 0.0, 0.0
    for w in waves:
        t0 = time.perf_counter()
        f = rec.features_of(w)
        t1 = time.perf_counter()
        rec.decode_features(f)
        t2 = time.perf_counter()
        total.append(t2 - t0)
        feat_t += t1 - t0
        net_t += t2 - t1
        audio_s += len(w) / rec.features.sample_rate
    ms = np.array(total) * 1000
    return {
        "utterances": len(waves),
        "audio_s": round(audio_s, 2),
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(ms, 95)), 2),
        "latency_ms_max": round(float(ms.max()), 2),
        "rtf": round(float(sum(total) / audio_s), 4),
        "rtf_fbank": round(feat_t / audio_s, 4),
        "rtf_model": round(net_t / audio_s, 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="export directory (model.onnx + model.json)")
    p.add_argument("--manifest", required=True, help="JSONL manifest of test utterances")
    p.add_argument("--out", help="write JSON results here")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--max-utts", type=int, default=200)
    p.add_argument("--decoder", choices=DECODERS, default="greedy")
    p.add_argument("--lm", help="ARPA file or directory with lm.arpa (default: <model-dir>/lm)")
    args = p.parse_args(argv)
    try:
        rec = Recognizer(args.model_dir, args.threads, args.decoder, args.lm)
        utts = read_manifest(args.manifest)[: args.max_utts]
        waves = [load_audio(u.audio, rec.features.sample_rate) for u in utts]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = measure(rec, waves)
    res["threads"], res["decoder"] = args.threads, args.decoder
    print(f"[latency] {res['utterances']} utts, {args.decoder}, p50 {res['latency_ms_p50']} ms, "
          f"p95 {res['latency_ms_p95']} ms, RTF {res['rtf']} ({args.threads} thread)", file=sys.stderr)
    if args.out:
        write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
