"""The recognition service, through the real server: a subprocess on a free loopback port, real
espeak-ng speech, real sockets (HTTP, WebSocket), a real SIGTERM and a real headless Chromium.
The model is tests/serve_model.py's tiny overfitted Conformer-CTC, built once per session."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import serve_model
import soundfile as sf
import websockets.exceptions as ws_exceptions
import websockets.sync.client as ws_client
from conftest import ROOT, run_env

from hpc_asr.data.features import load_audio, resample
from hpc_asr.decode.wer import error_counts, rates
from hpc_asr.deploy.recognizer import Recognizer

LIMITS = ["--serve.max_body_bytes", "400000", "--serve.max_audio_s", "8", "--serve.max_streams", "2",
          "--serve.idle_timeout_s", "1.5", "--serve.partial_interval_s", "0.3"]


@pytest.fixture(scope="session")
def model() -> dict:
    """{"export": dir, "audio": {uid: (wav, text)}}: built once and kept in the user's cache under
    the hash of the recipe (serve_model.py), so a changed recipe builds afresh."""
    return serve_model.build(serve_model.cache_dir())


@pytest.fixture(scope="session")
def offline(model) -> dict[str, str]:
    """What the Recognizer says offline for each utterance: the reference for every server answer."""
    rec = Recognizer(model["export"])
    return {uid: rec(load_audio(wav, 16000)) for uid, (wav, _) in model["audio"].items()}


class Server:
    """``python -m hpc_asr serve`` in a subprocess on port 0; the port is read from its log line."""

    def __init__(self, model_dir: str, *args: str):
        self.log: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "hpc_asr", "serve", "--model-dir", model_dir,
                                      "--port", "0", *args], cwd=ROOT, env=run_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._pump, daemon=True).start()
        self.port = self._wait(r"listening on http://127\.0\.0\.1:(\d+)", 120)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while httpx.get(f"{self.url}/readyz").status_code != 200:
            assert self.proc.poll() is None and time.time() < deadline, "".join(self.log)
            time.sleep(0.2)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def _wait(self, pattern: str, timeout: float) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.log):
                m = re.search(pattern, line)
                if m:
                    return int(m.group(1))
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{''.join(self.log)}"
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in {timeout} s:\n{''.join(self.log)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def server(model):
    s = Server(model["export"], *LIMITS)
    yield s
    assert s.stop() == 0, "".join(s.log)


def wav_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def int16(x: np.ndarray) -> np.ndarray:
    """float samples -> 16-bit PCM, rounded: a WAV's own samples come back exactly."""
    return np.clip(np.round(x * 32768), -32768, 32767).astype("<i2")


def encode(x: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def post(url: str, body: bytes, ctype: str | None = "audio/wav", **params) -> httpx.Response:
    headers = {"content-type": ctype} if ctype else {}
    return httpx.post(f"{url}/v1/recognize", content=body, headers=headers, params=params, timeout=60)


# ---------------------------------------------------------------- offline requests


def test_recognize_matches_offline_recognizer(server, model, offline):
    right = 0
    for uid, (wav, text) in model["audio"].items():
        r = post(server.url, wav_bytes(wav))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["text"] == offline[uid] and out["text"], (uid, out)
        assert " ".join(w["word"] for w in out["words"]) == out["text"]
        starts = [w["start"] for w in out["words"]]
        assert starts == sorted(starts) and all(w["start"] < w["end"] for w in out["words"])
        assert out["timings"]["audio_s"] == pytest.approx(len(load_audio(wav, 16000)) / 16000, abs=1e-3)
        right += out["text"] == text
    assert right >= 0.8 * len(model["audio"])  # the model really recognises its sentences


def test_recognize_formats_and_rates(server, model, offline):
    uid = "s3v1"
    x = load_audio(model["audio"][uid][0], 16000)
    pcm = int16(x)
    cases = [(encode(x, 16000, "FLAC"), "audio/flac", {}),
             (encode(x, 16000, "FLAC"), "application/octet-stream", {}),  # sniffed
             (pcm.tobytes(), "audio/pcm", {"rate": "16000"}),
             (pcm.astype(">i2").tobytes(), "audio/L16; rate=16000", {}),
             (pcm.tobytes(), "audio/l16;rate=16000;endianness=little-endian", {})]
    for body, ctype, params in cases:
        r = post(server.url, body, ctype, **params)
        assert r.status_code == 200 and r.json()["text"] == offline[uid], (ctype, r.text)
    x44 = resample(x, 16000, 44100)  # another rate: resampled as prep does, then the same model
    r = post(server.url, encode(x44, 44100, "WAV"))
    expected = Recognizer(model["export"])(resample(sf.read(io.BytesIO(encode(x44, 44100, "WAV")),
                                                            dtype="float32")[0], 44100, 16000))
    assert r.status_code == 200 and r.json()["text"] == expected == offline[uid]


def test_health_ready_metrics(server, model):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    # the labelled histograms show their buckets after a first request (this test may run first)
    assert post(server.url, wav_bytes(model["audio"]["s1v0"][0])).status_code == 200
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["decoder"] == "greedy" and ready["providers"][0].endswith("Provider")
    assert (ready["mode"], ready["chunk_ms"]) == ("redecode", None)  # an offline export: no streaming.onnx
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("hpc_asr_requests_total", "hpc_asr_errors_total", "hpc_asr_request_seconds_bucket",
                 "hpc_asr_rtf_bucket", "hpc_asr_active_streams", "hpc_asr_batch_size_bucket"):
        assert name in text


def _metric(url: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and (not labels or "{" + want + "}" in line or f"{{{want}}}" in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _hostile_bodies(model) -> list[tuple[str, bytes, str | None, dict, int, str]]:
    wav = wav_bytes(model["audio"]["s1v0"][0])
    flac = encode(load_audio(model["audio"]["s1v0"][0], 16000), 16000, "FLAC")
    long_pcm = np.zeros(9 * 8000, "<i2").tobytes()  # 9 s at 8 kHz: 144 kB, under the body limit, over 8 s
    return [("garbage", b"this is not audio at all" * 10, "audio/wav", {}, 400, "bad_audio"),
            ("truncated wav", wav[: len(wav) // 2], "audio/wav", {}, 400, "truncated_audio"),
            ("truncated flac", flac[: len(flac) // 2], "audio/flac", {}, 400, "truncated_audio"),
            ("header only", wav[:44], "audio/wav", {}, 400, "truncated_audio"),
            ("wrong content type", wav, "text/plain", {}, 415, "unsupported_media"),
            ("no content type", wav, None, {}, 415, "unsupported_media"),
            ("body over the limit", b"\0" * 500_000, "audio/pcm", {"rate": "16000"}, 413, "body_too_large"),
            ("audio over the limit", long_pcm, "audio/pcm", {"rate": "8000"}, 413, "audio_too_long"),
            ("odd pcm", b"\0" * 1001, "audio/pcm", {"rate": "16000"}, 400, "bad_audio"),
            ("bad rate", b"\0" * 1000, "audio/pcm", {"rate": "fast"}, 400, "bad_rate"),
            ("absurd rate", b"\0" * 1000, "audio/l16;rate=5", {}, 400, "bad_rate"),
            ("empty", b"", "audio/wav", {}, 400, "bad_audio"),
            ("too short", np.zeros(100, "<i2").tobytes(), "audio/pcm", {"rate": "16000"}, 400, "bad_audio")]


def test_hostile_requests_get_4xx_and_service_keeps_serving(server, model, offline):
    good = wav_bytes(model["audio"]["s2v0"][0])
    for name, body, ctype, params, status, kind in _hostile_bodies(model):
        before = _metric(server.url, "hpc_asr_errors_total", kind=kind)
        r = post(server.url, body, ctype, **params)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()
        assert err["kind"] == kind and "\n" not in err["error"] and err["error"], (name, err)
        assert _metric(server.url, "hpc_asr_errors_total", kind=kind) == before + 1, name
        ok = post(server.url, good)
        assert ok.status_code == 200 and ok.json()["text"] == offline["s2v0"], name
    assert server.proc.poll() is None


def test_concurrent_load_no_5xx_no_lost_responses_and_batches(server, model, offline):
    items = list(model["audio"].items()) * 3
    batches_before = _metric(server.url, "hpc_asr_batch_size_count")
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(12) as pool:
        def one(item):
            uid, (wav, _) = item
            r = client.post(f"{server.url}/v1/recognize", content=wav_bytes(wav),
                            headers={"content-type": "audio/wav"})
            return uid, r.status_code, r.json()
        results = list(pool.map(one, items))
    assert len(results) == len(items)
    assert [s for _, s, _ in results] == [200] * len(items)
    assert all(out["text"] == offline[uid] for uid, _, out in results)
    runs = _metric(server.url, "hpc_asr_batch_size_count") - batches_before
    assert runs < len(items), f"{len(items)} concurrent requests took {runs} model runs: no batching"


# ---------------------------------------------------------------- streaming


def _ws(server: Server):
    return ws_client.connect(f"ws://127.0.0.1:{server.port}/v1/stream", open_timeout=30, close_timeout=10)


def stream_audio(server: Server, x: np.ndarray, rate: int = 16000, chunk_s: float = 0.1, pace: float = 0.05):
    """Send ``x`` in chunks (``pace`` seconds apart); returns (messages, index of the first message
    received after "end" was sent)."""
    msgs, sent_end = [], None
    pcm = int16(x)
    step = int(chunk_s * rate)
    with _ws(server) as ws:
        ws.send(json.dumps({"type": "start", "rate": rate}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        for i in range(0, len(pcm), step):
            ws.send(pcm[i:i + step].tobytes())
            time.sleep(pace)
            while True:
                try:
                    msgs.append(json.loads(ws.recv(timeout=0)))
                except TimeoutError:
                    break
        sent_end = len(msgs)
        ws.send(json.dumps({"type": "end"}))
        for raw in ws:
            msgs.append(json.loads(raw))
    return msgs, sent_end


def test_stream_partials_before_end_and_final_equals_offline(server, model, offline):
    for uid in ("s1v0", "s3v2"):
        x = load_audio(model["audio"][uid][0], 16000)
        msgs, sent_end = stream_audio(server, x)
        partials = [m for m in msgs[:sent_end] if m["type"] == "partial"]
        assert partials, f"no partial before the end of the audio: {msgs}"
        assert msgs[-1]["type"] == "final" and msgs[-1]["text"] == offline[uid], msgs[-1]
        assert " ".join(w["word"] for w in msgs[-1]["words"]) == offline[uid]
        assert any(p["text"] for p in partials) and partials[-1]["audio_s"] < len(x) / 16000 + 1e-6
        t = msgs[-1]["timings"]
        assert 0 < t["first_partial_ms"] < 1000 * len(x) / 16000 and 0 <= t["final_after_end_ms"] < 10_000


def test_stream_at_another_rate(server, model, offline):
    x = load_audio(model["audio"]["s4v1"][0], 16000)
    msgs, _ = stream_audio(server, resample(x, 16000, 48000), rate=48000, chunk_s=0.25, pace=0.02)
    assert msgs[-1]["type"] == "final" and msgs[-1]["text"] == offline["s4v1"]


def _refused(server: Server, *sends, wait: float = 30) -> tuple[int, dict]:
    """Send ``sends`` on a fresh stream; return (close code, the error message)."""
    with _ws(server) as ws:
        for s in sends:
            ws.send(s)
        msgs = []
        try:
            while True:
                msgs.append(json.loads(ws.recv(timeout=wait)))
        except ws_exceptions.ConnectionClosed:
            pass
        return ws.close_code, msgs[-1]


def test_stream_hostile_cases_close_4xxx_and_service_keeps_serving(server, model, offline):
    start = json.dumps({"type": "start", "rate": 16000})
    long_chunk = np.zeros(9 * 16000, "<i2").tobytes()  # 9 s > serve.max_audio_s
    cases = [("audio before start", (b"\0\0" * 800,), 4400, "bad_message"),
             ("not JSON", ("hello",), 4400, "bad_message"),
             ("start without rate", (json.dumps({"type": "start"}),), 4400, "bad_rate"),
             ("unknown type", (start, json.dumps({"type": "pause"})), 4400, "bad_message"),
             ("odd PCM", (start, b"\0" * 801), 4400, "bad_audio"),
             ("too long", (start, long_chunk), 4413, "audio_too_long"),
             ("idle client", (start, b"\0\0" * 1600), 4408, "idle_timeout")]
    x = load_audio(model["audio"]["s5v0"][0], 16000)
    for name, sends, code, kind in cases:
        got, err = _refused(server, *sends)
        assert (got, err.get("kind"), err.get("type")) == (code, kind, "error"), (name, got, err)
        msgs, _ = stream_audio(server, x, chunk_s=0.5, pace=0)
        assert msgs[-1]["text"] == offline["s5v0"], name


def test_too_many_streams_refused_at_handshake(server, model, offline):
    with _ws(server) as a, _ws(server) as b:  # serve.max_streams = 2
        for w in (a, b):
            w.send(json.dumps({"type": "start", "rate": 16000}))
            w.recv(timeout=30)
        with pytest.raises(ws_exceptions.InvalidStatus) as e:
            _ws(server)
        assert e.value.response.status_code == 429
        assert json.loads(e.value.response.body)["kind"] == "too_many_streams"
    time.sleep(0.3)
    msgs, _ = stream_audio(server, load_audio(model["audio"]["s0v1"][0], 16000), chunk_s=0.5, pace=0)
    assert msgs[-1]["text"] == offline["s0v1"]


def test_beam_lm_decoder_chosen_by_config(model):
    """--decode.decoder beam+lm: the LM beside the export, the same answer as the offline Recognizer
    with that decoder, over POST and the stream; no word times (the beam decoder gives none)."""
    rec = Recognizer(model["export"], decoder="beam+lm")
    s = Server(model["export"], "--decode.decoder", "beam+lm", "--decode.beam_size", "8")
    try:
        assert httpx.get(f"{s.url}/readyz").json()["decoder"] == "beam+lm"
        for uid in ("s0v2", "s3v0"):
            wav, text = model["audio"][uid]
            want = Recognizer(model["export"], decoder="beam+lm", beam_size=8)(load_audio(wav, 16000))
            out = post(s.url, wav_bytes(wav)).json()
            assert out["text"] == want and "words" not in out
            assert rec(load_audio(wav, 16000)) == text  # the LM knows the sentences: beam+lm gets them right
            msgs, _ = stream_audio(s, load_audio(wav, 16000), chunk_s=0.5, pace=0)
            assert msgs[-1]["text"] == want
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------- lifecycle


def test_sigterm_drains_in_flight_request_and_refuses_new(model, offline):
    s = Server(model["export"])
    body = wav_bytes(model["audio"]["s3v0"][0])
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=60)
    sock.sendall(f"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
    time.sleep(0.5)  # the request is in flight: headers in, body arriving
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 30
    while time.time() < deadline:  # the listener closes at once ...
        try:
            socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
            time.sleep(0.1)
        except OSError:
            break
    else:
        raise AssertionError("new connections still accepted 30 s after SIGTERM")
    sock.sendall(body[1000:])  # ... while the in-flight request finishes
    raw = b""
    while b"}" not in raw.rpartition(b"\r\n\r\n")[2]:
        chunk = sock.recv(65536)
        assert chunk, raw
        raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert json.loads(payload)["text"] == offline["s3v0"]
    assert s.proc.wait(60) == 0, "".join(s.log)


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpc_asr", "serve", "--model-dir", str(tmp_path)], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "model.onnx" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hpc_asr", "serve", "--model-dir", str(tmp_path),
                           "--serve.max_streams", "0"], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "serve.max_streams must be >= 1, got 0" in proc.stderr


# ---------------------------------------------------------------- the peer: sherpa-onnx


def test_sherpa_onnx_loads_our_export_and_transcribes_like_the_service(server, model, tmp_path):
    import sherpa_onnx  # noqa: F401 (pinned: must be there)

    from hpc_asr.deploy import sherpa

    props = sherpa.export_sherpa(model["export"], tmp_path / "sherpa")
    assert props["model_type"] == "wenet_ctc" and props["subsampling_factor"] == "4"
    tokens = (tmp_path / "sherpa" / "tokens.txt").read_text().splitlines()
    assert tokens[0] == "<blk> 0" and "▁ 1" in tokens and int(props["vocab_size"]) == len(tokens)
    rec = sherpa.recognizer(tmp_path / "sherpa", threads=1)
    for uid, (wav, _) in model["audio"].items():
        ours = post(server.url, wav_bytes(wav)).json()["text"]
        assert sherpa.transcribe(rec, load_audio(wav, 16000), 16000) == ours, uid


# ---------------------------------------------------------------- the browser page


def test_browser_page_streams_microphone_and_uploads(server, model, offline, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium is not None, "Debian's chromium is not installed: make setup installs it (apt-get install chromium)"
    from playwright import sync_api
    uid = "s3v1"
    assert offline[uid] == model["audio"][uid][1]  # one the model gets right, so the page shows the real words
    x = load_audio(model["audio"][uid][0], 16000)
    # Chromium plays the file from when the microphone opens, in a loop: 0.4 s of the noise floor (the
    # page's capture starts a moment later), the utterance, then seconds of the noise floor
    pad = serve_model.NOISE_FLOOR * np.random.default_rng(0).standard_normal(6 * 16000).astype(np.float32)
    fake = tmp_path / "mic.wav"
    sf.write(str(fake), np.concatenate([pad[:6400], x, pad]), 16000, subtype="PCM_16")
    seconds = round(len(x) / 16000 + 0.5, 1)  # the page stops itself after the utterance
    args = ["--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={fake}",
            "--use-fake-ui-for-media-stream", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                       headless=True, args=args)
        try:
            page = browser.new_page()
            frames: list[dict] = []  # what the server sent the page over the WebSocket
            page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(json.loads(f))))
            page.goto(server.url + "/")
            page.fill("#seconds", str(seconds))
            page.click("#record")
            page.wait_for_function("document.getElementById('partial').textContent.length > 0", timeout=60_000)
            assert page.text_content("#final") == ""  # a partial came while audio was still being sent
            page.wait_for_function("document.getElementById('final').textContent.length > 0", timeout=60_000)
            shown = page.text_content("#final")
            finals = [f for f in frames if f["type"] == "final"]
            assert len(finals) == 1 and shown == finals[0]["text"]  # the page shows the server's final
            assert [f for f in frames if f["type"] == "partial"], frames
            # The microphone path (Chromium's capture, 48 kHz -> 16 kHz, a start a few ms into the file)
            # is not the file: the tiny model gets the words right, give or take a letter.
            cer = rates(error_counts([offline[uid]], [shown]))[1]
            assert cer <= 0.1, (shown, offline[uid])
            page.set_input_files("#file", model["audio"]["s4v0"][0])
            page.click("#upload")
            page.wait_for_function("document.getElementById('upload-result').textContent.length > 0",
                                   timeout=60_000)
            assert page.text_content("#upload-result") == offline["s4v0"]
            shot = os.environ.get("HPC_ASR_SERVE_SCREENSHOT") or str(tmp_path / "serve-page.png")
            page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()


# ---------------------------------------------------------------- providers


def test_provider_choice(model, offline):
    import onnxruntime as ort

    from hpc_asr.config import DecodeConfig, ServeConfig
    from hpc_asr.deploy.serve.backend import Backend, providers_for

    assert providers_for("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match=r"serve\.provider=cuda"):
            providers_for("cuda")
        assert providers_for("auto") == ["CPUExecutionProvider"]
        pytest.skip("no CUDA provider in this onnxruntime: the GPU half of this test needs onnxruntime-gpu")
    b = Backend(model["export"], ServeConfig(provider="cuda"), DecodeConfig())
    assert b.providers[0] == "CUDAExecutionProvider"
    wav, _ = model["audio"]["s1v2"]
    (lp,) = b.run_batch([b.featurize(load_audio(wav, 16000))])
    assert b.decode(lp)[0] == offline["s1v2"]
