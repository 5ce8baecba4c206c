"""Load-test the recognition service on loopback and compare the same model under sherpa-onnx.

    hpc-asr bench serve --model-dir runs/demo/export --manifest data/va/test.jsonl \
        --out runs/bench/serve.json          (make bench-serve)

Starts ``hpc-asr serve`` as a subprocess (ONNX Runtime, 1 intra-op thread unless ``--threads``),
then sends ``--requests`` POSTs split over concurrency levels (default 1/4/16): WAV bodies of the
manifest's utterances with every ``--hostile-every``-th request a hostile one (garbage, truncated
WAV, wrong content type, oversized body) that must get its 4xx. Then WebSocket streams paced in
real time (partials by re-decoding: today's export is an offline model). Offline, in this process:
the Recognizer's RTF at 1 thread and sherpa-onnx on the same network (``hpc_asr.deploy.sherpa``),
same utterances, same threads, with both WERs. Writes JSON, prints a table, plots latency vs load.
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
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from hpc_asr.atomic import atomic_path, write_json_atomic
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


async def _streams(url: str, waves: list[np.ndarray], refs: list[str], n: int, concurrency: int, rate: int) -> dict:
    """``n`` WebSocket sessions, 100 ms chunks paced in real time; first partial after the first
    audio, final after "end"."""
    from websockets.asyncio.client import connect

    sem, rows = asyncio.Semaphore(concurrency), []
    ws_url = url.replace("http://", "ws://") + "/v1/stream"

    async def one(i: int) -> None:
        x = np.clip(np.round(waves[i % len(waves)] * 32768), -32768, 32767).astype("<i2")
        step = rate // 10
        async with sem, connect(ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "rate": rate}))
            await ws.recv()
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
            rows.append({"first_partial_ms": None if first is None else 1000 * first,
                         "final_after_end_ms": 1000 * (time.perf_counter() - t_end),
                         "ok": final is not None and final["type"] == "final",
                         "hyp": (final or {}).get("text", ""), "ref": refs[i % len(refs)]})

    await asyncio.gather(*(one(i) for i in range(n)))
    first = [r["first_partial_ms"] for r in rows if r["first_partial_ms"] is not None]
    fin = [r["final_after_end_ms"] for r in rows]
    return {"streams": n, "concurrency": concurrency, "ok": sum(r["ok"] for r in rows),
            "first_partial_ms_p50": round(float(np.median(first)), 1) if first else None,
            "final_after_end_ms_p50": round(float(np.median(fin)), 1),
            "final_after_end_ms_p95": round(float(np.percentile(fin, 95)), 1),
            "wer": round(rates(error_counts([r["ref"] for r in rows], [r["hyp"] for r in rows]))[0], 4)}


def _engines(model_dir: Path, waves: list[np.ndarray], refs: list[str], threads: int, rate: int) -> dict:
    """Ours (Recognizer: FBANK + ONNX Runtime + greedy) vs sherpa-onnx on the same ONNX network,
    waveform -> text, one utterance at a time, ``threads`` threads each, best of 3 passes."""
    import torch

    from hpc_asr.deploy import sherpa
    from hpc_asr.deploy.recognizer import Recognizer

    torch.set_num_threads(threads)  # our FBANK (torch) gets the same threads as both ONNX Runtime sessions
    ours = Recognizer(model_dir, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        sherpa.export_sherpa(model_dir, tmp)
        peer = sherpa.recognizer(tmp, threads=threads)
        audio_s = sum(len(w) for w in waves) / rate
        times = {"ours": [], "sherpa": []}
        hyps = {}
        for _ in range(3):
            for name, fn in (("ours", ours), ("sherpa", lambda w: sherpa.transcribe(peer, w, rate))):
                t0 = time.perf_counter()
                hyps[name] = [fn(w) for w in waves]
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    out = _int8(model_dir, waves, refs, threads, best["ours"], hyps["ours"])
    rtf_key = "rtf_onnx_1thread" if threads == 1 else f"rtf_onnx_{threads}threads"
    return {**out, rtf_key: round(best["ours"] / audio_s, 5),
            "rtf_sherpa_onnx": round(best["sherpa"] / audio_s, 5),
            "speedup_vs_sherpa_onnx": round(best["sherpa"] / best["ours"], 3),
            "wer_ours": round(rates(error_counts(refs, hyps["ours"]))[0], 4),
            "wer_sherpa_onnx": round(rates(error_counts(refs, hyps["sherpa"]))[0], 4),
            "transcripts_identical_to_sherpa": hyps["ours"] == hyps["sherpa"]}


def _int8(model_dir: Path, waves: list[np.ndarray], refs: list[str], threads: int, fp32_s: float,
          fp32_hyps: list[str]) -> dict:
    """``model.int8.onnx`` (``hpc-asr export --int8``) against model.onnx, same path, best of 3."""
    from hpc_asr.deploy.recognizer import Recognizer

    if not (model_dir / "model.int8.onnx").is_file():
        return {}
    q = Recognizer(model_dir, threads=threads, model_file="model.int8.onnx")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        hyps = [q(w) for w in waves]
        times.append(time.perf_counter() - t0)
    wer = {k: rates(error_counts(refs, h))[0] for k, h in (("fp32", fp32_hyps), ("int8", hyps))}
    return {"int8_speedup": round(fp32_s / min(times), 3), "int8_wer_cost": round(wer["int8"] - wer["fp32"], 4),
            "wer_int8": round(wer["int8"], 4)}


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
    lines = ["mode                               latency                 WER", "-" * 66]
    for lv in res["levels"]:
        lines.append(f"service POST, {lv['concurrency']:>2} clients            p50 {lv['p50_ms']:7.1f} ms "
                     f"p95 {lv['p95_ms']:7.1f} (server p50 {lv['server_p50_ms']:.1f})  {res['wer_service']:.2%}")
    s = res["stream_redecode"]
    lines.append(f"service stream (re-decode), {s['concurrency']:>2}     final-after-end p50 "
                 f"{s['final_after_end_ms_p50']:6.1f} ms  {s['wer']:.2%}")
    lines.append(f"in-process ours, 1 thread          RTF {res['rtf_onnx_1thread']:.4f}          "
                 f"{res['wer_ours']:.2%}")
    lines.append(f"in-process sherpa-onnx, 1 thread   RTF {res['rtf_sherpa_onnx']:.4f}          "
                 f"{res['wer_sherpa_onnx']:.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("runs/demo/export"))
    p.add_argument("--manifest", type=Path, default=Path("data/va/test.jsonl"), help="utterances (JSONL manifest)")
    p.add_argument("--max-utts", type=int, default=50)
    p.add_argument("--requests", type=int, default=1200, help="POSTs over all concurrency levels (>= 1000)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--hostile-every", type=int, default=10, help="every Nth request is hostile (0 = none)")
    p.add_argument("--streams", type=int, default=8)
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
    try:
        levels = [asyncio.run(_offline_load(url, bodies, n, c, args.hostile_every))
                  for c, n in zip(levels_c, per_level)]
        stream = asyncio.run(_streams(url, waves, refs, args.streams, min(4, args.streams), rate))
    finally:
        proc.terminate()
        server_rc = proc.wait(120)
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
           "levels": levels, "stream_redecode": stream, "server_exit_code": server_rc}
    res.update(_engines(args.model_dir, waves, refs, 1, rate))
    res["wall_s"] = round(time.time() - t0, 1)
    res["not_measured"] = {"onnx_vs_eager_speedup": "needs the checkpoint (eager PyTorch); the export has none",
                           **({} if "int8_speedup" in res else {
                               "int8_speedup, int8_wer_cost": "the export has no model.int8.onnx (export --int8)"}),
                           "first_partial_ms, final_after_end_ms, streaming_wer_cost":
                           "need the streaming model; stream_redecode holds the re-decoding service's numbers"}
    write_json_atomic(args.out, res)
    _plot(levels, args.out.with_name("serve_latency.png"))
    print(_table(res))
    print(f"[bench serve] {args.out}: {res['requests']} requests, 5xx {res['server_5xx']}, lost "
          f"{res['lost_responses']}, hostile rejected {res['hostile_rejected']}, speedup vs sherpa-onnx "
          f"{res['speedup_vs_sherpa_onnx']}x, {res['wall_s']} s", file=sys.stderr)
    return 0 if res["server_5xx"] == 0 and res["lost_responses"] == 0 and res["hostile_rejected"] else 1


if __name__ == "__main__":
    sys.exit(main())
