"""One WebSocket stream's recognition state, behind a small interface a streaming model can fill.

Protocol on ``/v1/stream`` (text frames are JSON):

    client: {"type": "start", "rate": 16000}           first message; rate of the PCM that follows
    server: {"type": "ready", "model_rate": 16000, "mode": "chunked"|"redecode", "chunk_ms": 160.0|null,
             "partial_interval_s": 0.16}
    client: <binary: 16-bit little-endian mono PCM>     any number, any size
    server: {"type": "partial", "text": ..., "audio_s": ...}   while audio arrives
    client: {"type": "end"}
    server: {"type": "final", "text": ..., "words": [...], "timings": {..., "first_partial_ms",
             "final_after_end_ms"}}, then close 1000
    server: {"type": "error", "status": 4xx, "kind": ..., "error": ...}, then close 4000 + status

Two sessions fill the ``StreamSession`` protocol; the route (app.py) picks one per service:

- ``ChunkSession`` (chunked.py) where the export has ``streaming.onnx`` and ``serve.streaming`` is
  ``auto``: each chunk of audio is resampled, featurized and fed to the streaming graph once, its
  attention and convolution caches carried; a partial after every complete chunk, the final equal
  to ``OnnxStream.utterance`` on the whole audio with the configured decoder.
- ``RedecodeSession`` (here) for an offline export or ``serve.streaming: off``: re-decodes everything
  received so far each time ``partial_interval_s`` of new audio has arrived (cost grows with the
  utterance; it is bounded by ``serve.max_audio_s``), and the final transcript is exactly the
  offline one of the whole audio.

The route itself times ``first_partial_ms`` and ``final_after_end_ms`` for either.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np

from hpc_asr.deploy.serve.audio import stream_pcm, to_rate

__all__ = ["RedecodeSession", "StreamSession"]

# (samples at the model's rate) -> {"text", "words"?, "timings"}: featurize + batched model + decoder
Recognize = Callable[[np.ndarray], Awaitable[dict]]


class StreamSession(Protocol):
    """What the WebSocket route needs from a stream's recognizer."""

    def accept(self, pcm: bytes) -> None:
        """Take a chunk of 16-bit PCM (raises Rejected: odd length, over the length limit)."""

    def partial_due(self) -> bool:
        """Whether enough new audio arrived for another partial transcript."""

    async def partial(self) -> dict:
        """{"text", "audio_s"} of the audio so far."""

    async def final(self) -> dict:
        """{"text", "words"?, "timings"} of the whole stream."""


class RedecodeSession:
    """Partial transcripts by re-decoding the audio so far with the offline model."""

    def __init__(self, rate: int, model_rate: int, recognize: Recognize, interval_s: float, max_audio_s: float):
        self.rate, self.model_rate, self.recognize = rate, model_rate, recognize
        self.interval, self.max_audio_s = int(interval_s * rate), max_audio_s
        self.chunks: list[np.ndarray] = []
        self.samples = 0
        self.decoded = 0  # samples covered by the last partial
        self.last_audio_t = time.perf_counter()

    def accept(self, pcm: bytes) -> None:
        x = stream_pcm(pcm, self.samples, self.rate, self.max_audio_s)
        self.chunks.append(x)
        self.samples += len(x)
        self.last_audio_t = time.perf_counter()

    def partial_due(self) -> bool:
        return self.samples - self.decoded >= self.interval

    def _audio(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return to_rate(self.chunks[0], self.rate, self.model_rate, self.max_audio_s)

    async def partial(self) -> dict:
        n = self.samples
        if n < self.rate * 0.05:  # shorter than a few FBANK windows: nothing to say yet
            return {"text": "", "audio_s": round(n / self.rate, 3)}
        self.decoded = n
        out = await self.recognize(self._audio())
        return {"text": out["text"], "audio_s": round(n / self.rate, 3)}

    async def final(self) -> dict:
        if self.samples == 0:
            return {"text": "", "timings": {"audio_s": 0.0}}
        out = await self.recognize(self._audio())
        out["timings"]["final_after_last_audio_ms"] = round(1000 * (time.perf_counter() - self.last_audio_t), 2)
        return out
