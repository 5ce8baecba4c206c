"""Load-test the recognition service on loopback and compare the same model under sherpa-onnx.

    hpc-asr bench serve --model-dir runs/demo/export --manifest data/va/test.jsonl \
        --out runs/bench/serve.json          (make bench-serve)

Starts ``hpc-asr serve`` as a subprocess (ONNX Runtime, 1 intra-op thread unless ``--threads``),
then sends ``--requests`` POSTs split over concurrency levels (default 1/4/16): WAV bodies of the
manifest's utterances with every ``--hostile-every``-th request a hostile one (garbage, truncated
WAV, wrong content type, oversized body) that must get its 4xx. Then WebSocket streams paced in
real time, one per utterance by default, in whatever mode ``/readyz`` reports: ``chunked`` (the
export has ``streaming.onnx``: top-level ``first_partial_ms``, ``final_after_end_ms``, their p95s,
``streaming_wer`` and ``streaming_wer_cost`` against the same service's POST answers on the same
utterances) or ``redecode`` (an offline export: ``stream_redecode``). Offline, in this process: the
Recognizer's RTF at 1 thread, sherpa-onnx on the same network (``hpc_asr.deploy.sherpa``) and,
when the checkpoint is found, PyTorch eager on the same features, same utterances, same threads.
Writes JSON, prints a table, plots latency vs load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from hpc_asr.atomic import atomic_path, write_json_atomic
from hpc_asr.bench import serve_inprocess
from hpc_asr.data.features import load_audio
from hpc_asr.data.manifest import read_manifest
from hpc_asr.decode.wer import error_counts, rates

__all__ = ["main"]

MAX_BODY = 2_000_000  # the bench server's serve.max_body_bytes (the oversized hostile body is just above)


def _start_server(model_dir: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "hpc_asr", "serve", "--model-dir", str(model_dir), "--port", "0",
           "--serve.intra_threads", str(threads), "--serve.max_body_bytes", str(MAX_BODY),
           "--serve.max_streams", "64", "--serve.max_queue", "1024"]
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        m = re.search(r"listening on (http://\S+)", log.read_text())
        if m and "[serve] ready" in log.read_text():
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in 300 s: {log.read_text()[-2000:]}")


def _hostile(wav: bytes) -> list[tuple[str, bytes, str, int]]:
    return [("garbage", b"not audio" * 50, "audio/wav", 400), ("truncated", wav[: len(wav) // 2], "audio/wav", 400),
            ("content type", wav, "text/plain", 415), ("oversized", b"\0" * (MAX_BODY + 2), "audio/wav", 413)]


async def _offline_load(url: str, bodies: list[tuple[bytes, float, str]], n: int, concurrency: int,
                        hostile_every: int) -> dict:
    import httpx

    hostile = _hostile(bodies[0][0])
    sem, rows = asyncio.Semaphore(concurrency), []

    async def one(client, i: int) -> None:
        async with sem:
            if hostile_every and i % hostile_every == hostile_every - 1:
                name, body, ctype, want = hostile[(i // hostile_every) % len(hostile)]
                audio_s, ref = 0.0, None
            else:
                (body, audio_s, ref), ctype, want, name = bodies[i % len(bodies)], "audio/wav", 200, "valid"
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/recognize", content=body, headers={"content-type": ctype})
                out = r.json()
                status, text = r.status_code, out.get("text") if r.status_code == 200 else None
                server_ms = out["timings"]["total_ms"] if r.status_code == 200 else None
            except httpx.HTTPError:
                status, text, server_ms = -1, None, None  # a lost response
            rows.append({"kind": name, "want": want, "status": status, "ms": 1000 * (time.perf_counter() - t0),
                         "server_ms": server_ms,
                         "audio_s": audio_s, "ref": ref, "hyp": text})

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    wall = time.perf_counter() - t0
    valid = [r for r in rows if r["kind"] == "valid"]
    ms = np.array([r["ms"] for r in valid if r["status"] == 200] or [np.nan])
    server_ms = np.array([r["server_ms"] for r in valid if r["status"] == 200] or [np.nan])
    return {"concurrency": concurrency, "requests": len(rows), "valid": len(valid), "wall_s": round(wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "server_p50_ms": round(float(np.percentile(server_ms, 50)), 2),
            "server_5xx": sum(r["status"] >= 500 for r in rows), "lost": sum(r["status"] == -1 for r in rows),
            "hostile": sum(r["kind"] != "valid" for r in rows),
            "hostile_rejected": sum(r["kind"] != "valid" and r["status"] == r["want"] for r in rows),
            "valid_ok": sum(r["kind"] == "valid" and r["status"] == 200 for r in rows),
            "audio_s_per_s": round(sum(r["audio_s"] for r in valid if r["status"] == 200) / wall, 2),
            "rows": rows}


def _ready(url: str) -> dict:
    """``/readyz``: {"mode": "chunked"|"redecode", "chunk_ms", ...} of the running service."""
    import httpx

    return httpx.get(f"{url}/readyz", timeout=30).json()


def _p(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def _streams(url: str, waves: list[np.ndarray], refs: list[str], n: int, concurrency: int, rate: int,
                   piece_ms: float = 100.0) -> dict:
    """``n`` WebSocket sessions (utterance ``i % len(waves)``), ``piece_ms`` pieces of PCM paced in
    real time. Per stream the server's own timings (final message: ``first_partial_ms`` from the
    first audio byte to the first non-empty partial, ``final_after_end_ms`` from "end" to the
    final) and the client's (first non-empty partial after the first audio sent, final after
    "end" sent)."""
    from websockets.asyncio.client import connect

    sem, rows, modes = asyncio.Semaphore(concurrency), [], set()
    ws_url = url.replace("http://", "ws://") + "/v1/stream"

    async def one(i: int) -> None:
        x = np.clip(np.round(waves[i % len(waves)] * 32768), -32768, 32767).astype("<i2")
        step = max(1, int(rate * piece_ms / 1000))
        async with sem, connect(ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "rate": rate}))
            modes.add(json.loads(await ws.recv()).get("mode"))
            first, t_start = None, time.perf_counter()

            async def reader():
                nonlocal first
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg["type"] == "partial" and msg["text"] and first is None:
                        first = time.perf_counter() - t_start
                    if msg["type"] in ("final", "error"):
                        return msg
            task = asyncio.create_task(reader())
            for j in range(0, len(x), step):
                await ws.send(x[j:j + step].tobytes())
                await asyncio.sleep(step / rate)
            t_end = time.perf_counter()
            await ws.send(json.dumps({"type": "end"}))
            final = await task
            ok = final is not None and final["type"] == "final"
            timings = final.get("timings", {}) if ok else {}
            rows.append({"first_partial_ms": timings.get("first_partial_ms"),
                         "final_after_end_ms": timings.get("final_after_end_ms"),
                         "client_first_partial_ms": None if first is None else 1000 * first,
                         "client_final_after_end_ms": 1000 * (time.perf_counter() - t_end),
                         "ok": ok, "utt": i % len(waves), "hyp": (final or {}).get("text", ""),
                         "ref": refs[i % len(refs)]})

    await asyncio.gather(*(one(i) for i in range(n)))

    def col(k: str) -> list[float]:
        return [r[k] for r in rows if r[k] is not None]

    return {"streams": n, "concurrency": concurrency, "piece_ms": piece_ms, "ok": sum(r["ok"] for r in rows),
            "modes_in_ready": sorted(str(m) for m in modes),
            "streams_without_partial": sum(r["first_partial_ms"] is None for r in rows),
            **{f"{k}_p{q}": _p(col(k), q) for k in ("first_partial_ms", "final_after_end_ms",
                                                    "client_first_partial_ms", "client_final_after_end_ms")
               for q in (50, 95)},
            "wer": round(rates(error_counts([r["ref"] for r in rows], [r["hyp"] for r in rows]))[0], 4),
            "utts": [r["utt"] for r in rows]}  # per stream, for the offline WER over the same ones


async def _post_each(url: str, bodies: list[tuple[bytes, float, str]], idx: list[int]) -> list[str | None]:
    """One POST per utterance ``idx``, one at a time: the service's offline answers."""
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=120) as client:
        for i in idx:
            r = await client.post(f"{url}/v1/recognize", content=bodies[i][0], headers={"content-type": "audio/wav"})
            out.append(r.json()["text"] if r.status_code == 200 else None)
    return out


def _plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    c = [lv["concurrency"] for lv in levels]
    ax.plot(c, [lv["p50_ms"] for lv in levels], "o-", label="p50")
    ax.plot(c, [lv["p95_ms"] for lv in levels], "s--", label="p95")
    ax.set(xscale="log", xticks=c, xticklabels=[str(v) for v in c], xlabel="concurrent clients",
           ylabel="latency, ms (POST /v1/recognize)", title="hpc_asr serve: latency vs load")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _table(res: dict) -> str:
    def pct(v):
        return "   n/a" if v is None else f"{v:.2%}"

    def ms(v):
        return "n/a" if v is None else f"{v:.1f} ms"

    lines = ["mode                               latency                 WER", "-" * 66]
    for lv in res["levels"]:
        lines.append(f"service POST, {lv['concurrency']:>2} clients            p50 {lv['p50_ms']:7.1f} ms "
                     f"p95 {lv['p95_ms']:7.1f} (server p50 {lv['server_p50_ms']:.1f})  {pct(res['wer_service'])}")
    if "stream_chunked" in res:
        s = res["stream_chunked"]
        lines.append(f"service stream (chunked {res['chunk_ms']:g} ms), {s['concurrency']:>2}  first partial p50 "
                     f"{ms(res['first_partial_ms'])}, final-after-end p50 {ms(res['final_after_end_ms'])}  "
                     f"{pct(res['streaming_wer'])} (POST {pct(res['offline_wer_same_utterances'])})")
    else:
        s = res["stream_redecode"]
        lines.append(f"service stream (re-decode), {s['concurrency']:>2}     final-after-end p50 "
                     f"{ms(s['final_after_end_ms_p50'])}  {pct(s['wer'])}")
    lines.append(f"in-process ours, 1 thread          RTF {res['rtf_onnx_1thread']:.4f}          "
                 f"{pct(res['wer_ours'])}")
    if res.get("rtf_sherpa_onnx") is not None:
        lines.append(f"in-process sherpa-onnx, 1 thread   RTF {res['rtf_sherpa_onnx']:.4f}          "
                     f"{pct(res['wer_sherpa_onnx'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("runs/demo/export"))
    p.add_argument("--manifest", type=Path, default=Path("data/va/test.jsonl"), help="utterances (JSONL manifest)")
    p.add_argument("--max-utts", type=int, default=50)
    p.add_argument("--requests", type=int, default=1200, help="POSTs over all concurrency levels (>= 1000)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--hostile-every", type=int, default=10, help="every Nth request is hostile (0 = none)")
    p.add_argument("--streams", type=int, default=0, help="WebSocket streams (0 = one per utterance)")
    p.add_argument("--stream-concurrency", type=int, default=4)
    p.add_argument("--piece-ms", type=float, default=100.0, help="PCM per WebSocket message, paced in real time")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="for onnx_vs_eager_speedup (default: export.json's, ../last.pt or ../ckpt/last.pt "
                        "when its sha256 is model.json's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/bench/serve.json"))
    args = p.parse_args(argv)
    for need in (args.model_dir / "model.onnx", args.manifest):
        if not need.is_file():
            print(f"error: {need}: not found (make demo writes runs/demo/export and data/va/test.jsonl)",
                  file=sys.stderr)
            return 2
    utts = read_manifest(args.manifest)[: args.max_utts]
    rate = json.loads((args.model_dir / "model.json").read_text())["features"]["sample_rate"]
    waves = [load_audio(u.audio, rate, convert=True) for u in utts]
    refs = [u.text for u in utts]
    def wav(x):
        buf = io.BytesIO()
        sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    bodies = [(wav(x), len(x) / rate, t) for x, t in zip(waves, refs)]
    levels_c = [int(c) for c in args.concurrency.split(",")]
    weights = np.array(levels_c, float) ** 0.5
    per_level = [max(50, int(args.requests * w / weights.sum())) for w in weights]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proc, url = _start_server(args.model_dir, args.threads, args.out.with_suffix(".server.log"))
    n_streams = args.streams or len(utts)
    try:
        ready = _ready(url)
        levels = [asyncio.run(_offline_load(url, bodies, n, c, args.hostile_every))
                  for c, n in zip(levels_c, per_level)]
        stream = asyncio.run(_streams(url, waves, refs, n_streams, min(args.stream_concurrency, n_streams), rate,
                                      args.piece_ms))
        once = sorted(set(stream["utts"]))
        post = dict(zip(once, asyncio.run(_post_each(url, bodies, once))))  # the same utterances, offline
    finally:
        proc.terminate()
        server_rc = proc.wait(120)
    stream_utts = stream.pop("utts")
    stream["offline_wer"] = round(rates(error_counts([refs[i] for i in stream_utts],
                                                     [post[i] or "" for i in stream_utts]))[0], 4)
    mode, chunk_ms = ready.get("mode", "redecode"), ready.get("chunk_ms")
    rows = [r for lv in levels for r in lv.pop("rows")]
    valid1 = [r for r in rows if r["kind"] == "valid" and r["status"] == 200]
    res = {"model_dir": str(args.model_dir), "manifest": str(args.manifest), "utterances": len(utts),
           "mean_utterance_s": round(float(np.mean([len(w) / rate for w in waves])), 2),
           "cores": os.cpu_count(), "threads": args.threads,
           "p50_ms": levels[0]["p50_ms"],
           "p95_ms_under_load": levels[-1]["p95_ms"],
           "requests": len(rows), "server_5xx": sum(lv["server_5xx"] for lv in levels),
           "lost_responses": sum(lv["lost"] for lv in levels),
           "hostile_requests": sum(lv["hostile"] for lv in levels),
           "hostile_rejected": all(lv["hostile_rejected"] == lv["hostile"] for lv in levels),
           "throughput_audio_s_per_s_per_core": round(levels[-1]["audio_s_per_s"] / (os.cpu_count() or 1), 2),
           "wer_service": round(rates(error_counts([r["ref"] for r in valid1], [r["hyp"] for r in valid1]))[0], 4),
           "levels": levels, "stream_mode": mode, "chunk_ms": chunk_ms, "server_exit_code": server_rc}
    not_measured = {}
    if mode == "chunked":
        target = chunk_ms + 50.0
        res.update({"first_partial_ms": stream["first_partial_ms_p50"],
                    "first_partial_ms_p95": stream["first_partial_ms_p95"],
                    "final_after_end_ms": stream["final_after_end_ms_p50"],
                    "final_after_end_ms_p95": stream["final_after_end_ms_p95"],
                    "final_after_end_target_ms": target,
                    "final_after_end_within_target": stream["final_after_end_ms_p50"] is not None
                    and stream["final_after_end_ms_p50"] <= target,
                    "streaming_wer": stream["wer"], "offline_wer_same_utterances": stream["offline_wer"],
                    "streaming_wer_cost": round(stream["wer"] - stream["offline_wer"], 4),
                    "stream_chunked": stream})
    else:
        res["stream_redecode"] = stream
        not_measured["first_partial_ms, final_after_end_ms, streaming_wer, streaming_wer_cost"] = (
            "the service re-decodes (no streaming.onnx in the export: a model.streaming checkpoint exported by "
            "hpc-asr export has one); stream_redecode holds the re-decoding service's numbers")
    engines, why = serve_inprocess.engines(args.model_dir, waves, refs, 1, rate)
    res.update(engines)
    not_measured.update(why)
    ckpt, why_not = serve_inprocess.find_checkpoint(args.model_dir, args.checkpoint)
    try:
        if ckpt is None:
            raise FileNotFoundError(why_not)
        res.update(serve_inprocess.eager(args.model_dir, ckpt, waves, 1))
    except Exception as e:  # null with the reason, not a crash
        res["onnx_vs_eager_speedup"] = None
        not_measured["onnx_vs_eager_speedup"] = (why_not if ckpt is None else f"{type(e).__name__}: {e}")[:300]
    if "int8_speedup" not in res:
        res.update(int8_speedup=None, int8_wer_cost=None)
        not_measured["int8_speedup, int8_wer_cost"] = "the export has no model.int8.onnx (export --int8)"
    res["wall_s"] = round(time.time() - t0, 1)
    res["not_measured"] = not_measured
    write_json_atomic(args.out, res)
    _plot(levels, args.out.with_name("serve_latency.png"))
    print(_table(res))
    chunked = (f", {mode} streams: final after end p50 {res['final_after_end_ms']} ms (target "
               f"{res['final_after_end_target_ms']:g}), streaming WER cost {res['streaming_wer_cost']}"
               if mode == "chunked" else f", {mode} streams")
    print(f"[bench serve] {args.out}: {res['requests']} requests, 5xx {res['server_5xx']}, lost "
          f"{res['lost_responses']}, hostile rejected {res['hostile_rejected']}, speedup vs sherpa-onnx "
          f"{res['speedup_vs_sherpa_onnx']}x, onnx vs eager {res['onnx_vs_eager_speedup']}x{chunked}, "
          f"{res['wall_s']} s", file=sys.stderr)
    return 0 if res["server_5xx"] == 0 and res["lost_responses"] == 0 and res["hostile_rejected"] else 1


if __name__ == "__main__":
    sys.exit(main())
