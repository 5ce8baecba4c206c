"""Stream latency of the service on the tiny streaming test model (tests/serve_model.py, built or
taken from the cache): one utterance per sentence, sent as 16-bit PCM in ``--piece-ms`` pieces
paced in real time, against a server streaming in chunks (streaming.onnx) and one forced to
re-decode (``--serve.streaming off``). Prints the medians of the server's own timings
(``first_partial_ms``: first audio byte -> first non-empty partial; ``final_after_end_ms``:
"end" -> final) and how many finals were right (docs/streaming.md quotes its output).

    OMP_NUM_THREADS=1 python tests/serve_stream_latency.py [--piece-ms 40]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_model
from test_serve import Server, stream_audio

from hpc_asr.data.features import load_audio


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--piece-ms", type=float, default=40.0)
    args = p.parse_args()
    m = serve_model.build(serve_model.cache_dir(streaming=True), streaming=True)
    utts = [(uid, load_audio(wav, 16000), text) for uid, (wav, text) in m["audio"].items() if uid.endswith("v0")]
    out = {}
    for mode, extra in (("chunked", []), ("redecode", ["--serve.streaming", "off"])):
        s = Server(m["export"], *extra)
        try:
            rows = []
            for _, x, text in utts:
                piece = args.piece_ms / 1000
                msgs, _ = stream_audio(s, x, chunk_s=piece, pace=piece)
                t = msgs[-1]["timings"]
                rows.append((t["first_partial_ms"], t["final_after_end_ms"], msgs[-1]["text"] == text))
        finally:
            s.stop()
        first = [r[0] for r in rows if r[0] is not None]
        out[mode] = {"streams": len(rows), "right": sum(r[2] for r in rows),
                     "first_partial_ms_p50": round(float(np.median(first)), 1) if first else None,
                     "final_after_end_ms_p50": round(float(np.median([r[1] for r in rows])), 1),
                     "final_after_end_ms_max": round(max(r[1] for r in rows), 1)}
    print(json.dumps({"piece_ms": args.piece_ms, **out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
