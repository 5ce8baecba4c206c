"""The routes: ``/`` (the page), ``/healthz``, ``/readyz``, ``/metrics``, ``POST /v1/recognize``
and the ``/v1/stream`` WebSocket, over one ``Service`` (backend + batcher + metrics).

The model loads in the background after start-up: ``/healthz`` answers at once, ``/readyz`` turns
200 when the model is loaded and 503 again once SIGTERM starts the drain (``cli``). Every refusal
is a ``limits.Rejected``: JSON ``{"error", "kind", "status"}`` with its 4xx (a WebSocket gets the
same as an ``error`` message, then close code 4000 + status); the service keeps serving.

A stream is a ``ChunkSession`` (hpc_asr.deploy.serve.chunked: chunks fed once through
``streaming.onnx``) where the export has a streaming graph and ``serve.streaming`` is ``auto``, a
``RedecodeSession`` otherwise; ``/readyz`` and the ``ready`` message say which (``mode``,
``chunk_ms``). Every stream's final carries ``first_partial_ms`` (first audio byte to the first
non-empty partial) and ``final_after_end_ms`` (the client's ``end`` to the final message).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.websockets import WebSocketDisconnect, WebSocketState

from hpc_asr.config import Config
from hpc_asr.deploy.serve.audio import MAX_RATE, decode_body
from hpc_asr.deploy.serve.batching import Batcher
from hpc_asr.deploy.serve.chunked import ChunkSession
from hpc_asr.deploy.serve.limits import Rejected
from hpc_asr.deploy.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from hpc_asr.deploy.serve.page import PAGE
from hpc_asr.deploy.serve.stream import RedecodeSession, StreamSession

__all__ = ["Service", "create_app"]


class Service:
    """What the routes share: the loaded model, the batcher, the metrics and the drain flag."""

    def __init__(self, model_dir: str | Path, cfg: Config):
        self.model_dir, self.cfg, self.limits = Path(model_dir), cfg, cfg.serve
        self.metrics = Metrics()
        self.backend = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.draining = False
        self.streams = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.serve.feature_threads, thread_name_prefix="audio")

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining

    async def load(self) -> None:
        """Load the export off the event loop, then start the batcher."""
        import torch

        from hpc_asr.deploy.serve.backend import Backend

        torch.set_num_threads(self.limits.feature_threads)  # FBANK; ONNX Runtime has its own threads
        try:
            backend = await asyncio.to_thread(Backend, self.model_dir, self.limits, self.cfg.decode)
        except Exception as e:  # reported by /readyz and the log, the process stays up
            self.load_error = f"{type(e).__name__}: {e}"
            print(f"[serve] error: cannot load {self.model_dir}: {self.load_error}", flush=True)
            return
        s = self.limits
        self.batcher = Batcher(backend.run_items, s.max_batch, s.max_batch_frames, s.max_wait_ms, s.max_queue,
                               self.metrics.batch_size.observe)
        self.batcher.start()
        self.backend = backend
        print(f"[serve] ready: {self.model_dir} ({self.cfg.decode.decoder}, {backend.providers[0]}, streams: "
              f"{backend.mode})", flush=True)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.pool.shutdown(wait=False)

    def check_open(self) -> None:
        if self.draining:
            raise Rejected(503, "draining", "the service is shutting down; retry on another instance")
        if self.batcher is None:
            raise Rejected(503, "not_ready", self.load_error or "the model is still loading; poll /readyz")

    async def recognize(self, samples: np.ndarray) -> dict:
        """Samples at the model's rate -> {"text", "words"?, "timings"}."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        feats = await loop.run_in_executor(self.pool, self.backend.featurize, samples)
        t1 = time.perf_counter()
        text, words = await self.batcher.submit(feats)
        t2 = time.perf_counter()
        audio_s = len(samples) / self.backend.sample_rate
        out = {"text": text, "timings": {"audio_s": round(audio_s, 3), "features_ms": round(1000 * (t1 - t0), 2),
                                         "model_ms": round(1000 * (t2 - t1), 2),
                                         "rtf": round((t2 - t0) / max(audio_s, 1e-9), 5)}}
        if words is not None:
            out["words"] = words
        return out


def _refuse(svc: Service, endpoint: str, e: Rejected) -> JSONResponse:
    svc.metrics.errors.labels(e.kind).inc()
    svc.metrics.requests.labels(endpoint, str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "body_too_large", f"body of {int(declared)} bytes exceeds serve.max_body_bytes={limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Rejected(413, "body_too_large", f"body over serve.max_body_bytes={limit} bytes")
    return bytes(body)


def create_app(model_dir: str | Path, cfg: Config) -> FastAPI:
    svc = Service(model_dir, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(svc.load())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await svc.close()

    app = FastAPI(title="hpc_asr recognition service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not svc.ready:
            state = "draining" if svc.draining else "failed" if svc.load_error else "loading"
            return JSONResponse({"status": state, "error": svc.load_error}, status_code=503)
        b = svc.backend
        return JSONResponse({"status": "ready", "model_dir": str(svc.model_dir), "decoder": cfg.decode.decoder,
                             "providers": b.providers, "sample_rate": b.sample_rate, "mode": b.mode,
                             "chunk_ms": b.chunk_ms})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/recognize")
    async def recognize(request: Request) -> JSONResponse:
        endpoint, t0 = "/v1/recognize", time.perf_counter()
        try:
            svc.check_open()
            body = await _read_body(request, svc.limits.max_body_bytes)
            samples = await asyncio.get_running_loop().run_in_executor(
                svc.pool, decode_body, body, request.headers.get("content-type"), request.query_params.get("rate"),
                svc.backend.sample_rate, svc.limits.max_audio_s)
            out = await svc.recognize(samples)
        except Rejected as e:
            return _refuse(svc, endpoint, e)
        except Exception as e:  # one line to the client and the log; the service keeps serving
            svc.metrics.errors.labels("internal").inc()
            svc.metrics.requests.labels(endpoint, "500").inc()
            print(f"[serve] error: {endpoint}: {type(e).__name__}: {e}", flush=True)
            return JSONResponse({"error": f"internal error: {type(e).__name__}", "kind": "internal", "status": 500},
                                status_code=500)
        total = time.perf_counter() - t0
        out["timings"]["total_ms"] = round(1000 * total, 2)
        m = svc.metrics
        m.requests.labels(endpoint, "200").inc()
        m.latency.labels(endpoint).observe(total)
        m.rtf.observe(total / max(out["timings"]["audio_s"], 1e-9))
        m.audio_seconds.inc(out["timings"]["audio_s"])
        return JSONResponse(out)

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        endpoint = "/v1/stream"
        try:
            svc.check_open()
            if svc.streams >= svc.limits.max_streams:
                raise Rejected(429, "too_many_streams", f"{svc.streams} streams open (serve.max_streams="
                               f"{svc.limits.max_streams}): retry later")
        except Rejected as e:  # refused at the handshake with a real HTTP status
            await ws.send_denial_response(_refuse(svc, endpoint, e))
            return
        await ws.accept()
        svc.streams += 1
        svc.metrics.active_streams.inc()
        try:
            code = await _run_stream(ws, svc)
        finally:
            svc.streams -= 1
            svc.metrics.active_streams.dec()
        svc.metrics.requests.labels(endpoint, str(code)).inc()

    return app


def _start_message(text: str, svc: Service) -> StreamSession:
    """The session for a stream's first message: chunks through the streaming graph where the
    backend has one, else re-decoding with the offline model."""
    try:
        msg = json.loads(text)
    except json.JSONDecodeError:
        reason = 'text messages must be JSON, e.g. {"type": "start", "rate": 16000}'
        raise Rejected(400, "bad_message", reason) from None
    if not isinstance(msg, dict) or msg.get("type") != "start":
        raise Rejected(400, "bad_message",
                       f"first message must be {{\"type\": \"start\", \"rate\": R}}, got {text[:80]!r}")
    rate = msg.get("rate", msg.get("sample_rate"))
    if not isinstance(rate, int) or isinstance(rate, bool) or not 4000 <= rate <= MAX_RATE:
        raise Rejected(400, "bad_rate", f"start.rate must be an integer in [4000, {MAX_RATE}] Hz, got {rate!r}")
    s, b = svc.limits, svc.backend
    if b.stream is not None:
        loop = asyncio.get_running_loop()
        return ChunkSession(rate, b.features, b.stream.window, b.stream.shift, b.stream.new_state(),
                            svc.batcher.submit, lambda f, *a: loop.run_in_executor(svc.pool, f, *a), s.max_audio_s)
    return RedecodeSession(rate, b.sample_rate, svc.recognize, s.partial_interval_s, s.max_audio_s)


async def _send_partial(ws: WebSocket, session: StreamSession, clock: dict) -> None:
    """Best effort: a busy queue, too little audio or a client gone skips this partial (the final
    still comes, or the loop sees the disconnect)."""
    try:
        out = await session.partial()
        if out["text"] and clock["first_partial"] is None:
            clock["first_partial"] = time.perf_counter()
        if ws.client_state == WebSocketState.CONNECTED:
            await ws.send_json({"type": "partial", **out})
    except (Rejected, WebSocketDisconnect, RuntimeError):
        return


async def _run_stream(ws: WebSocket, svc: Service) -> int:
    """The session loop; returns the close code (1000 final sent, 4xxx refused, 1001 client left)."""
    session: StreamSession | None = None
    partial: asyncio.Task | None = None
    clock: dict = {"first_audio": None, "first_partial": None}  # perf_counter() times
    idle = svc.limits.idle_timeout_s
    try:
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), idle)
            except TimeoutError:
                raise Rejected(408, "idle_timeout", f"no message for {idle:g} s (serve.idle_timeout_s)") from None
            if msg["type"] == "websocket.disconnect":
                return 1001
            if msg.get("bytes") is not None:
                if session is None:
                    raise Rejected(400, "bad_message", "binary audio before the start message")
                if clock["first_audio"] is None:
                    clock["first_audio"] = time.perf_counter()
                session.accept(msg["bytes"])
                if session.partial_due() and (partial is None or partial.done()):
                    partial = asyncio.create_task(_send_partial(ws, session, clock))
                continue
            text = msg.get("text") or ""
            if session is None:
                session = _start_message(text, svc)
                b = svc.backend
                await ws.send_json({"type": "ready", "model_rate": b.sample_rate, "mode": b.mode,
                                    "chunk_ms": b.chunk_ms, "partial_interval_s": (
                                        svc.limits.partial_interval_s if b.chunk_ms is None else b.chunk_ms / 1000)})
                continue
            if _type_of(text) != "end":
                raise Rejected(400, "bad_message", f"expected binary audio or {{\"type\": \"end\"}}, got {text[:80]!r}")
            t0 = time.perf_counter()  # the client's "end"
            if partial is not None:
                await partial
            try:
                final = await session.final()
            except Rejected as e:
                if e.kind != "bad_audio":
                    raise
                final = {"text": "", "timings": {"note": e.reason}}  # under one FBANK window of audio
            first, done = clock["first_partial"], time.perf_counter()
            final["timings"]["first_partial_ms"] = None if first is None else round(
                1000 * (first - clock["first_audio"]), 2)
            final["timings"]["final_after_end_ms"] = round(1000 * (done - t0), 2)
            await ws.send_json({"type": "final", **final})
            svc.metrics.latency.labels("/v1/stream").observe(time.perf_counter() - t0)
            await ws.close(1000)
            return 1000
    except Rejected as e:
        svc.metrics.errors.labels(e.kind).inc()
        if ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.send_json({"type": "error", **e.body()})
                await ws.close(e.close_code, e.reason[:120])
        return e.close_code
    except WebSocketDisconnect:
        return 1001
    finally:
        if partial is not None and not partial.done():
            partial.cancel()


def _type_of(text: str) -> str | None:
    try:
        msg = json.loads(text)
    except json.JSONDecodeError:
        return None
    return msg.get("type") if isinstance(msg, dict) else None
