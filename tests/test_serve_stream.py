"""WebSocket streams through a streaming export (``streaming.onnx``), on the real server over real
sockets: chunks fed once with their caches (``ChunkSession``), partials before the end, finals
equal to ``OnnxStream.utterance`` + the service's decoder on the whole audio, concurrent streams
batched, the re-decode path where the export has no streaming graph. The model is
tests/serve_model.py's tiny espeak model trained with ``model.streaming`` on."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import numpy as np
import pytest
import serve_model
from test_serve import Server, _metric, _refused, _ws, int16, stream_audio

from hpc_asr.config import ConfigError, DecodeConfig, ServeConfig
from hpc_asr.data.features import load_audio, resample
from hpc_asr.decode.ctc import greedy_ids
from hpc_asr.deploy.recognizer import Recognizer
from hpc_asr.deploy.streaming import OnnxStream
from hpc_asr.model import chunk_spans

LIMITS = ["--serve.max_audio_s", "8", "--serve.max_streams", "4", "--serve.idle_timeout_s", "5"]


@pytest.fixture(scope="module")
def smodel() -> dict:
    """The streaming variant of the serve tests' model (its export holds streaming.onnx), cached."""
    m = serve_model.build(serve_model.cache_dir(streaming=True), streaming=True)
    assert (serve_model.Path(m["export"]) / "streaming.onnx").is_file()
    return m


class Reference:
    """What the whole utterance gives through the streaming graph: ``OnnxStream.utterance`` on the
    FBANK of all the audio, decoded greedily or with another decoder."""

    def __init__(self, export: str):
        self.rec = Recognizer(export)
        self.stream = OnnxStream(f"{export}/streaming.onnx")

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        return self.stream.utterance(self.rec.features_of(x))

    def greedy(self, lp: np.ndarray) -> str:
        return self.rec.tokenizer.decode(greedy_ids(lp, len(lp), self.rec.tokenizer.blank))


@pytest.fixture(scope="module")
def ref(smodel) -> Reference:
    return Reference(smodel["export"])


@pytest.fixture(scope="module")
def server(smodel):
    s = Server(smodel["export"], *LIMITS, "--serve.max_wait_ms", "30")  # a lone chunk waits 30 ms for company
    yield s
    assert s.stop() == 0, "".join(s.log)


def pcm_exact(x: np.ndarray) -> np.ndarray:
    """The samples the server gets from 16-bit PCM of ``x``."""
    return int16(x).astype(np.float32) / 32768.0


def test_ready_says_chunked(server):
    ready = httpx.get(f"{server.url}/readyz").json()
    assert (ready["mode"], ready["chunk_ms"]) == ("chunked", 160.0)  # 4 output frames x 4 x 10 ms
    with _ws(server) as ws:
        ws.send(json.dumps({"type": "start", "rate": 16000}))
        msg = json.loads(ws.recv(timeout=30))
    assert msg == {"type": "ready", "model_rate": 16000, "mode": "chunked", "chunk_ms": 160.0,
                   "partial_interval_s": 0.16}


def test_stream_partials_are_prefixes_and_final_equals_whole_utterance(server, smodel, ref):
    for uid in ("s1v0", "s3v2"):
        x = pcm_exact(load_audio(smodel["audio"][uid][0], 16000))
        lp = ref.log_probs(x)
        want = ref.greedy(lp)
        assert want == smodel["audio"][uid][1]  # a real transcript, not an empty one
        msgs, sent_end = stream_audio(server, x, chunk_s=0.05, pace=0.01)
        final = msgs[-1]
        assert final["type"] == "final" and final["text"] == want, final
        assert " ".join(w["word"] for w in final["words"]) == want
        t = final["timings"]
        assert t["chunks"] == len(chunk_spans(len(ref.rec.features_of(x)), 4, 4))  # each window fed once
        assert 0 < t["first_partial_ms"] < 1000 * len(x) / 16000 and 0 <= t["final_after_end_ms"] < 5000
        partials = [m for m in msgs if m["type"] == "partial"]
        before = [m for m in msgs[:sent_end] if m["type"] == "partial"]
        assert any(p["text"] for p in before), f"no non-empty partial before the end: {msgs}"
        # A partial is the greedy text of the stream's first k chunks (4 output frames each): the
        # log-probs of audio already fed never change
        prefixes = {ref.greedy(lp[: 4 * k]) for k in range(len(lp) // 4 + 2)}
        assert all(p["text"] in prefixes for p in partials), [p["text"] for p in partials]
        assert len({p["text"] for p in partials}) >= 3  # the text grows chunk by chunk


def test_stream_at_another_rate(server, smodel, ref):
    x = load_audio(smodel["audio"]["s4v1"][0], 16000)
    x48 = pcm_exact(resample(x, 16000, 48000))
    msgs, _ = stream_audio(server, x48, rate=48000, chunk_s=0.07, pace=0)
    want = ref.greedy(ref.log_probs(resample(x48, 48000, 16000)))  # prep's resampler on the whole audio
    assert msgs[-1]["type"] == "final" and msgs[-1]["text"] == want == "call mom"


def test_concurrent_streams_get_their_own_finals_in_shared_batches(server, smodel, ref):
    """Three streams sent chunk by chunk in turn: their chunks share model runs (batch sizes > 1)
    and each final is its own utterance's."""
    uids = ["s0v1", "s2v0", "s5v2"]
    xs = [pcm_exact(load_audio(smodel["audio"][u][0], 16000)) for u in uids]
    want = [ref.greedy(ref.log_probs(x)) for x in xs]
    assert want == [smodel["audio"][u][1] for u in uids]
    runs0, items0 = _metric(server.url, "hpc_asr_batch_size_count"), _metric(server.url, "hpc_asr_batch_size_sum")
    step = 1600  # 0.1 s
    conns = [_ws(server) for _ in uids]
    try:
        for ws in conns:
            ws.send(json.dumps({"type": "start", "rate": 16000}))
            assert json.loads(ws.recv(timeout=30))["mode"] == "chunked"
        for i in range(0, max(len(x) for x in xs), step):
            for ws, x in zip(conns, xs):
                if i < len(x):
                    ws.send(int16(x[i:i + step]).tobytes())
            time.sleep(0.02)
        for ws in conns:
            ws.send(json.dumps({"type": "end"}))
        finals = []
        for ws in conns:
            msgs = [json.loads(m) for m in ws]
            finals.append(msgs[-1])
    finally:
        for ws in conns:
            ws.close()
    assert [f["text"] for f in finals] == want
    runs = _metric(server.url, "hpc_asr_batch_size_count") - runs0
    items = _metric(server.url, "hpc_asr_batch_size_sum") - items0
    assert items > runs, f"{items} chunk jobs in {runs} model runs: no batching"


def test_batched_chunks_equal_each_stream_alone(smodel, ref):
    """``run_chunks``: streams at different offsets in one run_batch, a short last window in its own
    group, the same log-probs as each stream alone."""
    from hpc_asr.deploy.serve.chunked import ChunkJob, run_chunks

    st = ref.stream
    feats = [ref.rec.features_of(load_audio(smodel["audio"][u][0], 16000)) for u in ("s1v1", "s4v0")]
    alone = [st.utterance(f) for f in feats]
    states, out = [st.new_state(), st.new_state()], [[], []]
    spans = [chunk_spans(len(f), 4, 4) for f in feats]
    run_chunks(st, [ChunkJob(states[1], [feats[1][s:e] for s, e in spans[1][:3]], out[1])])  # 3 windows ahead
    a, b = spans[0], spans[1][3:]
    for k in range(0, max(len(a), len(b)), 5):
        jobs = [ChunkJob(states[0], [feats[0][s:e] for s, e in a[k:k + 5]], out[0]),
                ChunkJob(states[1], [feats[1][s:e] for s, e in b[k:k + 5]], out[1])]
        run_chunks(st, [j for j in jobs if j.windows])
    for got, want in zip(out, alone):
        np.testing.assert_allclose(np.concatenate(got), want, atol=1e-4)
        assert (np.concatenate(got).argmax(-1) == want.argmax(-1)).all()


def test_stream_refusals_in_chunked_mode(server, smodel, ref):
    start = json.dumps({"type": "start", "rate": 16000})
    for sends, code, kind in [((start, b"\0" * 801), 4400, "bad_audio"),
                              ((start, np.zeros(9 * 16000, "<i2").tobytes()), 4413, "audio_too_long")]:
        got, err = _refused(server, *sends)
        assert (got, err["kind"]) == (code, kind)
    x = pcm_exact(load_audio(smodel["audio"]["s2v1"][0], 16000))
    msgs, _ = stream_audio(server, x, chunk_s=0.5, pace=0)
    assert msgs[-1]["text"] == ref.greedy(ref.log_probs(x)) == "play some jazz"
    msgs, _ = stream_audio(server, x[:800], chunk_s=0.5, pace=0)  # 50 ms: under one window of 7 frames
    assert msgs[-1]["type"] == "final" and msgs[-1]["text"] == ""


def test_beam_lm_final_in_chunked_mode(smodel, ref):
    """The final uses the configured decoder over the stream's log-probs: beam+lm here."""
    beam = Recognizer(smodel["export"], decoder="beam+lm", beam_size=8)
    s = Server(smodel["export"], *LIMITS, "--decode.decoder", "beam+lm", "--decode.beam_size", "8")
    try:
        for uid in ("s0v2", "s3v0"):
            x = pcm_exact(load_audio(smodel["audio"][uid][0], 16000))
            want = beam.decode_log_probs(ref.log_probs(x))
            msgs, _ = stream_audio(s, x, chunk_s=0.2, pace=0)
            assert msgs[-1]["text"] == want == smodel["audio"][uid][1] and "words" not in msgs[-1]
    finally:
        assert s.stop() == 0, "".join(s.log)


def test_export_without_streaming_graph_redecodes(smodel, tmp_path):
    """The same export without streaming.onnx (or serve.streaming=off): RedecodeSession, whose final
    is the offline model's transcript."""
    export = tmp_path / "export"
    shutil.copytree(smodel["export"], export, ignore=shutil.ignore_patterns("streaming*.onnx"))
    s = Server(str(export), *LIMITS)
    try:
        ready = httpx.get(f"{s.url}/readyz").json()
        assert (ready["mode"], ready["chunk_ms"]) == ("redecode", None)
        x = pcm_exact(load_audio(smodel["audio"]["s5v1"][0], 16000))
        msgs, _ = stream_audio(s, x, chunk_s=0.5, pace=0)
        assert msgs[0]["type"] in ("partial", "final")
        assert msgs[-1]["text"] == Recognizer(export)(x) == "stop the music"
        assert msgs[-1]["timings"]["final_after_end_ms"] >= 0 and "chunks" not in msgs[-1]["timings"]
    finally:
        assert s.stop() == 0, "".join(s.log)
    from hpc_asr.deploy.serve.backend import Backend

    assert Backend(smodel["export"], ServeConfig(streaming="off"), DecodeConfig()).mode == "redecode"
    assert Backend(smodel["export"], ServeConfig(), DecodeConfig()).mode == "chunked"


def test_serve_streaming_is_validated():
    from hpc_asr.cli import load_config

    with pytest.raises(ConfigError, match=r"serve\.streaming"):
        ServeConfig(streaming="on")
    assert load_config(None, ["--serve.streaming", "off"]).serve.streaming == "off"  # YAML's `off` is false
    assert load_config(None, ["--serve.streaming", "auto"]).serve.streaming == "auto"


@pytest.mark.parametrize("rate", [16000, 44100])
def test_chunk_session_log_probs_equal_whole_utterance(smodel, ref, rate):
    """The session itself, without the server: PCM in uneven pieces, partials after one piece or
    several chunks' worth -> the stream's log-probs are OnnxStream.utterance's of the whole audio's
    FBANK (each frame computed once, windows overlapping as chunk_spans, caches carried)."""
    import asyncio

    from hpc_asr.deploy.serve.backend import Backend
    from hpc_asr.deploy.serve.chunked import ChunkSession

    b = Backend(smodel["export"], ServeConfig(), DecodeConfig())
    x = load_audio(smodel["audio"]["s1v2"][0], 16000)
    x = pcm_exact(x if rate == 16000 else resample(x, 16000, rate))
    whole = x if rate == 16000 else resample(x, rate, 16000)
    want = ref.log_probs(whole)

    async def submit(job):
        return b.run_items([job])[0]

    async def offload(f, *args):
        return f(*args)

    async def run() -> tuple[ChunkSession, dict]:
        s = ChunkSession(rate, b.features, b.stream.window, b.stream.shift, b.stream.new_state(), submit, offload, 60)
        rng, i, texts = np.random.default_rng(0), 0, []
        while i < len(x):
            n = int(rng.integers(1, rate // 4))  # 0 .. 250 ms: sometimes under a frame, sometimes several chunks
            s.accept(int16(x[i:i + n]).tobytes())
            i += n
            if s.partial_due() and rng.random() < 0.5:
                texts.append((await s.partial())["text"])
        assert any(texts)
        return s, await s.final()

    s, final = asyncio.run(run())
    got = np.concatenate(s.log_probs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert final["text"] == ref.greedy(want) == smodel["audio"]["s1v2"][1]
    assert final["timings"]["chunks"] == len(chunk_spans(len(ref.rec.features_of(whole)), 4, 4))
