"""``hpc-asr bench serve`` end to end on the tiny streaming test model (tests/serve_model.py with
``model.streaming``, cached): the service streams in chunks, and serve.json carries the chunked
keys beside the POST load, sherpa-onnx and eager comparisons. A small request count (~30 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import serve_model

ROOT = Path(__file__).resolve().parents[1]
MAX_STREAMING_WER = 0.10  # the tiny model recognises its own sentences: streamed finals are (nearly) all right


def test_bench_serve_chunked_streams(tmp_path):
    m = serve_model.build(serve_model.cache_dir(streaming=True), streaming=True)
    export = Path(m["export"])
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "-m", "hpc_asr", "bench", "serve", "--model-dir", str(export),
                        "--manifest", str(export.parent / "audio.jsonl"), "--max-utts", "6", "--requests", "100",
                        "--concurrency", "1,4", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (res["stream_mode"], res["chunk_ms"]) == ("chunked", 160.0)
    assert "stream_redecode" not in res and res["stream_chunked"]["modes_in_ready"] == ["chunked"]
    assert res["stream_chunked"]["ok"] == res["stream_chunked"]["streams"] == 6
    for key in ("first_partial_ms", "first_partial_ms_p95", "final_after_end_ms", "final_after_end_ms_p95"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["final_after_end_within_target"] == (res["final_after_end_ms"] <= res["chunk_ms"] + 50)
    assert isinstance(res["streaming_wer"], float) and res["streaming_wer"] <= MAX_STREAMING_WER
    assert res["streaming_wer_cost"] == round(res["streaming_wer"] - res["offline_wer_same_utterances"], 4)
    # the existing keys stand; sherpa-onnx and eager run on the offline model.onnx of a streaming checkpoint
    assert res["requests"] >= 100 and res["server_5xx"] == 0 and res["hostile_rejected"] is True
    assert res["p50_ms"] > 0 and res["p95_ms_under_load"] > 0 and res["rtf_onnx_1thread"] > 0
    assert res["throughput_audio_s_per_s_per_core"] > 0
    assert res["speedup_vs_sherpa_onnx"] > 0 and res["transcripts_identical_to_sherpa"] is True
    assert res["onnx_vs_eager_speedup"] > 0 and res["eager_streaming_checkpoint"] is True
    assert res["onnx_vs_eager_max_abs_diff"] < 1e-3
    assert {"int8_speedup", "int8_wer_cost"} <= res.keys()
    assert "chunked 160 ms" in r.stdout  # the table's chunked-stream row
