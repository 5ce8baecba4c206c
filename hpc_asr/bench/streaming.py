"""The cost of streaming, measured on a prepared split: offline WER against streaming WER at a
few chunk sizes, and the latencies a voice assistant feels.

    hpc-asr bench streaming --checkpoint runs/demo_streaming/last.pt --data data/va/fbank/test \
        --chunks 16,8 --out runs/bench/streaming.json

Per utterance: the full-context forward (offline), then for each chunk size the stream itself
(``forward_chunk`` chunk by chunk, greedy CTC) checked against the chunk-masked forward. Latency
runs on a simulated clock, one stream, ``--threads`` threads: FBANK frame i is complete at
10·i + 25 ms of audio; chunk k starts when its last frame is complete and the previous chunk is
done, and takes its measured compute time (model + greedy partial). ``first_partial_ms``: from
the start of audio to the first partial; ``final_after_end_ms``: from the end of audio to the
final transcript. FBANK is excluded (prepared features): the service's numbers include it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpc_asr import checkpoint
from hpc_asr.atomic import write_json_atomic
from hpc_asr.decode.ctc import greedy_ids
from hpc_asr.decode.evaluate import load_model_and_data
from hpc_asr.decode.wer import error_counts, rates
from hpc_asr.model import ConformerCTC, chunk_spans

__all__ = ["main", "measure_streaming", "stream_utterance"]

FRAME_MS, WINDOW_MS = 10.0, 25.0  # FBANK frame shift and length: frame i ends at 10·i + 25 ms


def stream_utterance(model: ConformerCTC, tok, feats: np.ndarray, chunk: int, left_chunks: int) -> dict:
    """One utterance (T, F) as a stream → its transcript, the partial after each chunk, and per
    chunk the audio time (ms) its input is complete and the compute time (ms) it took."""
    att, cnn = model.init_cache(1, chunk, left_chunks)
    offset, lps, parts, ready_ms, compute_ms = torch.zeros(1, dtype=torch.long), [], [], [], []
    x = torch.from_numpy(np.ascontiguousarray(feats))[None]
    for start, end in chunk_spans(len(feats), chunk, model.cfg.subsample_factor):
        t0 = time.perf_counter()
        with torch.no_grad():
            lp, att, cnn = model.forward_chunk(x[:, start:end], offset, att, cnn)
        offset = offset + lp.shape[1]
        lps.append(lp[0].numpy())
        partial = tok.decode(greedy_ids(np.concatenate(lps), int(offset[0]), tok.blank))  # the stream so far
        compute_ms.append((time.perf_counter() - t0) * 1000)
        ready_ms.append(FRAME_MS * (end - 1) + WINDOW_MS)
        parts.append(partial)
    return {"text": parts[-1] if parts else "", "partials": parts, "ready_ms": ready_ms, "compute_ms": compute_ms}


def _clock(ready_ms: list[float], compute_ms: list[float], audio_end_ms: float) -> tuple[float, float]:
    """(first partial, final after end of audio) on the simulated clock of one stream."""
    done, first = 0.0, None
    for ready, cost in zip(ready_ms, compute_ms):
        done = max(done, ready) + cost
        first = done if first is None else first
    return (first or 0.0), max(done - audio_end_ms, 0.0)


def _pct(values: list[float]) -> dict:
    v = np.asarray(values or [0.0])
    return {"p50": round(float(np.percentile(v, 50)), 2), "p95": round(float(np.percentile(v, 95)), 2),
            "max": round(float(v.max()), 2)}


def measure_streaming(model: ConformerCTC, tok, data, chunks: list[int], max_utts: int = 200,
                      left_chunks: int | None = None) -> dict:
    """Offline vs streaming WER and the stream's latencies over the first ``max_utts`` of ``data``."""
    left = model.cfg.left_chunks if left_chunks is None else left_chunks
    n = min(max_utts, len(data))
    refs = [data.texts[i] for i in range(n)]
    feats = [np.asarray(data.feats(i), np.float32) for i in range(n)]
    offline = []
    for x in feats:
        with torch.no_grad():
            lp, ln = model(torch.from_numpy(x)[None], torch.tensor([len(x)]))
        offline.append(tok.decode(greedy_ids(lp[0].numpy(), int(ln[0]), tok.blank)))
    off_wer, off_cer = rates(error_counts(refs, offline))
    out = {"utterances": n, "threads": torch.get_num_threads(), "left_chunks": left,
           "subsampling_factor": model.cfg.subsample_factor,
           "offline": {"wer": round(off_wer, 4), "cer": round(off_cer, 4)}, "streaming": {}}
    for chunk in chunks:
        if feats:  # warm-up: the first calls pay for allocation
            stream_utterance(model, tok, feats[0], chunk, left)
        hyps, masked, first, final = [], [], [], []
        for x in feats:
            s = stream_utterance(model, tok, x, chunk, left)
            with torch.no_grad():
                lp, ln = model(torch.from_numpy(x)[None], torch.tensor([len(x)]), chunk=chunk, left_chunks=left)
            masked.append(tok.decode(greedy_ids(lp[0].numpy(), int(ln[0]), tok.blank)))
            hyps.append(s["text"])
            f, e = _clock(s["ready_ms"], s["compute_ms"], FRAME_MS * (len(x) - 1) + WINDOW_MS)
            first.append(f)
            final.append(e)
        wer, cer = rates(error_counts(refs, hyps))
        f = model.cfg.subsample_factor
        out["streaming"][str(chunk)] = {
            "chunk_ms": chunk * f * FRAME_MS, "lookahead_ms": 6 * FRAME_MS, "wer": round(wer, 4), "cer": round(cer, 4),
            "wer_cost": round(wer - off_wer, 4), "equals_chunk_masked": hyps == masked,
            "mismatched_ids": [data.ids[i] for i in range(n) if hyps[i] != masked[i]][:20],
            "first_partial_ms": _pct(first), "final_after_end_ms": _pct(final)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpc-asr bench streaming", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model trained with model.streaming: true")
    p.add_argument("--data", required=True, help="prepared split, e.g. data/va/fbank/test")
    p.add_argument("--chunks", default="16,8", help="chunk sizes in output frames, comma-separated (default 16,8)")
    p.add_argument("--left-chunks", type=int, help="left context in chunks (default: the model's)")
    p.add_argument("--max-utts", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", help="write the JSON results here")
    args = p.parse_args(argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
        if not chunks or min(chunks) < 1:
            raise ValueError(f"--chunks: positive integers, got {args.chunks!r}")
        model, tok, _, data = load_model_and_data(args.checkpoint, args.data)
        if not model.cfg.streaming:
            raise ValueError(f"{args.checkpoint}: not a streaming model (train with --model.streaming true)")
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    res = measure_streaming(model, tok, data, chunks, args.max_utts, args.left_chunks)
    print(f"[bench streaming] {res['utterances']} utts, offline WER {res['offline']['wer']:.2%}", file=sys.stderr)
    for c, r in res["streaming"].items():
        print(f"  chunk {c} ({r['chunk_ms']:.0f} ms): WER {r['wer']:.2%} (+{r['wer_cost']:.2%}), first partial p50 "
              f"{r['first_partial_ms']['p50']} ms, final after end p50 {r['final_after_end_ms']['p50']} ms, "
              f"= chunk-masked: {r['equals_chunk_masked']}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
