"""Streams through the streaming export (``streaming.onnx``): every piece of audio is resampled,
featurized and fed to the model once, the attention and convolution caches carried along.

    PCM at the client's rate --soxr stream--> samples at the model's rate
        --FBANK of the new samples only--> frames
        --windows of W = (chunk-1)·f + 7 frames every chunk·f--> ChunkJob --batcher--> OnnxStream.run_batch

Each step is exact against the whole utterance, so the final transcript is the one of
``OnnxStream.utterance`` on the whole audio's FBANK with the service's decoder: soxr's stream
resampler gives the one-shot resampler's samples; a Kaldi FBANK frame (``snip_edges``) depends
only on its own 25 ms, so FBANK from the next frame's first sample gives exactly the next frames
(the 15 ms two frames share stay in the buffer); the windows are ``chunk_spans``'s (overlapping
by 7 - f frames, the last one shorter at the end). A partial feeds every window complete so far
and decodes the log-probs so far greedily; the final feeds the rest and decodes them all with the
configured decoder (greedy / beam / beam+lm).

Concurrent streams batch: a ``ChunkJob`` goes through the service's one ``Batcher`` (beside the
offline requests, on the one model thread that also owns the decoders), and ``run_chunks`` feeds
the k-th window of every job in the batch as one ``OnnxStream.run_batch`` call (windows of equal
length together: a stream's last, shorter window runs in its own group).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from hpc_asr.config import FeatureConfig
from hpc_asr.data.features import fbank, num_frames
from hpc_asr.deploy.serve.audio import stream_pcm
from hpc_asr.model import RECEPTIVE_FIELD

__all__ = ["ChunkJob", "ChunkSession", "run_chunks"]


@dataclass
class ChunkJob:
    """One stream's windows for one model run; ``run_chunks`` appends their log-probs to
    ``log_probs`` (the stream's output so far) and advances ``state`` (caches, offset)."""

    state: dict
    windows: list[np.ndarray]
    log_probs: list[np.ndarray]
    final: bool = False  # decode with the configured decoder (else greedy, for a partial)
    frames: int = field(init=False)

    def __post_init__(self) -> None:
        self.frames = sum(len(w) for w in self.windows)

    def __len__(self) -> int:  # the batcher's size budget counts input frames
        return max(1, self.frames)


def run_chunks(stream, jobs: list[ChunkJob]) -> None:
    """Feed every job's windows in order: step k runs the k-th window of all jobs that have one,
    windows of equal length as one ``stream.run_batch`` (each stream at its own offset)."""
    for k in range(max((len(j.windows) for j in jobs), default=0)):
        groups: dict[int, list[ChunkJob]] = {}
        for j in jobs:
            if k < len(j.windows):
                groups.setdefault(len(j.windows[k]), []).append(j)
        for group in groups.values():
            for j, lp in zip(group, stream.run_batch([j.state for j in group], [j.windows[k] for j in group])):
                j.log_probs.append(lp)


class ChunkSession:
    """A ``StreamSession`` over the streaming export: partials after every complete chunk."""

    def __init__(self, rate: int, features: FeatureConfig, window: int, shift: int, state: dict,
                 submit: Callable[[ChunkJob], Awaitable[tuple[str, list | None]]],
                 offload: Callable[..., Awaitable], max_audio_s: float):
        import soxr

        self.rate, self.cfg, self.window, self.shift = rate, features, window, shift
        self.state, self.submit, self.offload, self.max_audio_s = state, submit, offload, max_audio_s
        self.resampler = None if rate == features.sample_rate else soxr.ResampleStream(
            rate, features.sample_rate, 1, dtype="float32", quality="HQ")  # = soxr.resample, as prep does
        self.frame_len = int(features.sample_rate * features.frame_length_ms / 1000)
        self.frame_shift = int(features.sample_rate * features.frame_shift_ms / 1000)
        self.pending: list[np.ndarray] = []  # client-rate samples not featurized yet
        self.samples = 0  # client-rate samples received
        self.model_samples = 0  # model-rate samples featurized so far (and in ``buf``)
        self.buf = np.zeros(0, np.float32)  # model-rate samples from frame ``next_frame``'s first on
        self.next_frame = 0
        self.feats = np.zeros((0, features.num_mel_bins), np.float32)  # frames from the next window's start on
        self.log_probs: list[np.ndarray] = []
        self.windows_fed = 0
        self.text = ""
        self.features_s = self.model_s = 0.0
        self.last_audio_t = time.perf_counter()

    def accept(self, pcm: bytes) -> None:
        x = stream_pcm(pcm, self.samples, self.rate, self.max_audio_s)
        self.pending.append(x)
        self.samples += len(x)
        self.last_audio_t = time.perf_counter()

    def _windows_ready(self, frames: int) -> int:
        return 0 if frames < self.window else 1 + (frames - self.window) // self.shift

    def partial_due(self) -> bool:
        """A window more than the ones fed is complete (judged from the samples received)."""
        frames = num_frames(int(self.samples * self.cfg.sample_rate / self.rate), self.cfg)
        return self._windows_ready(frames) > self.windows_fed

    def _featurize(self, chunks: list[np.ndarray], last: bool) -> list[np.ndarray]:
        """New samples -> new FBANK frames (each computed once) -> the windows to feed now (the
        complete ones; at the end also the short last ones, ≥ 7 frames). Runs off the event loop."""
        x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        if self.resampler is not None:
            x = self.resampler.resample_chunk(x, last=last)
        if len(x):
            self.buf = np.concatenate([self.buf, x])
            self.model_samples += len(x)
        frames = num_frames(self.model_samples, self.cfg)
        new = frames - self.next_frame
        if new > 0:
            f = fbank(self.buf[: (new - 1) * self.frame_shift + self.frame_len], self.cfg)
            self.feats = np.concatenate([self.feats, f])
            self.buf, self.next_frame = self.buf[new * self.frame_shift:], frames
        need, out, s = RECEPTIVE_FIELD if last else self.window, [], 0
        while s + need <= len(self.feats):
            out.append(self.feats[s: s + self.window])
            s += self.shift
        return out

    async def _advance(self, final: bool) -> tuple[str, list | None]:
        chunks, self.pending = self.pending, []
        t0 = time.perf_counter()
        windows = await self.offload(self._featurize, chunks, final)
        t1 = time.perf_counter()
        self.features_s += t1 - t0
        if not windows and not final:
            return self.text, None
        if final and not windows and not self.log_probs:
            return "", None
        text, words = await self.submit(ChunkJob(self.state, windows, self.log_probs, final))
        self.model_s += time.perf_counter() - t1
        # Only now are the windows consumed: a partial refused by a full queue leaves them for the next
        drop = min(len(windows) * self.shift, len(self.feats))
        self.feats, self.windows_fed, self.text = self.feats[drop:], self.windows_fed + len(windows), text
        return text, words

    async def partial(self) -> dict:
        n = self.samples
        text, _ = await self._advance(final=False)
        return {"text": text, "audio_s": round(n / self.rate, 3)}

    async def final(self) -> dict:
        text, words = await self._advance(final=True)
        audio_s = self.samples / self.rate
        out = {"text": text, "timings": {
            "audio_s": round(audio_s, 3), "chunks": self.windows_fed,
            "features_ms": round(1000 * self.features_s, 2), "model_ms": round(1000 * self.model_s, 2),
            "final_after_last_audio_ms": round(1000 * (time.perf_counter() - self.last_audio_t), 2)}}
        if words is not None:
            out["words"] = words
        return out
