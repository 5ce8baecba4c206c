"""Request bytes -> mono float32 samples at the model's rate.

Accepted bodies of ``POST /v1/recognize``:

- WAV or FLAC (``audio/wav``, ``audio/x-wav``, ``audio/flac``, ...; ``application/octet-stream``
  is sniffed by its magic bytes): decoded by prep's own reader (``hpc_asr.data.features.load_audio``
  with ``convert``: channels averaged, other rates resampled with soxr as prep does). A WAV whose
  data chunk is shorter than its header states is refused (libsndfile would read the part silently).
- Raw 16-bit PCM, mono: ``audio/l16;rate=R`` (RFC 2586 big-endian; ``endianness=little-endian``
  as IBM's and Google's clients send it), or ``audio/pcm`` / ``application/octet-stream`` with
  ``?rate=R`` (little-endian, what a browser's Int16Array holds). The WebSocket takes the same
  little-endian PCM.
"""

from __future__ import annotations

import os
import struct
import tempfile

import numpy as np

from hpc_asr.data.features import MIN_SOURCE_RATE, AudioError, load_audio, resample
from hpc_asr.deploy.serve.limits import Rejected, too_long

__all__ = ["MAX_RATE", "decode_body", "parse_content_type", "pcm16", "stream_pcm", "to_rate"]

WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")
FLAC_TYPES = ("audio/flac", "audio/x-flac")
PCM_TYPES = ("audio/pcm", "application/octet-stream")
MAX_RATE = 192000
_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None  # the decoder reads a path: keep it in memory


def parse_content_type(header: str | None) -> tuple[str, dict[str, str]]:
    """``"audio/L16; rate=16000"`` -> ("audio/l16", {"rate": "16000"})."""
    mime, *params = (header or "").split(";")
    out = {}
    for p in params:
        k, _, v = p.partition("=")
        out[k.strip().lower()] = v.strip().strip('"').lower()
    return mime.strip().lower(), out


def _rate(value: str | None, where: str) -> int:
    try:
        rate = int(value or "")
    except ValueError:
        raise Rejected(400, "bad_rate", f"{where}: sample rate must be an integer, got {value!r}") from None
    if not MIN_SOURCE_RATE <= rate <= MAX_RATE:
        raise Rejected(400, "bad_rate", f"{where}: sample rate {rate} Hz outside [{MIN_SOURCE_RATE}, {MAX_RATE}]")
    return rate


def pcm16(data: bytes, big_endian: bool = False) -> np.ndarray:
    """16-bit mono PCM bytes -> float32 in [-1, 1]."""
    if len(data) % 2:
        raise Rejected(400, "bad_audio", f"16-bit PCM needs an even number of bytes, got {len(data)}")
    return np.frombuffer(data, ">i2" if big_endian else "<i2").astype(np.float32) / 32768.0


def to_rate(samples: np.ndarray, rate: int, target: int, max_audio_s: float) -> np.ndarray:
    """Length check (before any work), then soxr to the model's rate as prep does."""
    seconds = len(samples) / rate
    if seconds > max_audio_s:
        raise too_long(seconds, max_audio_s)
    if len(samples) == 0:
        raise Rejected(400, "bad_audio", "no samples")
    if rate == target:
        return np.ascontiguousarray(samples, np.float32)
    try:
        return resample(samples, rate, target, "request audio")
    except AudioError as e:
        raise Rejected(400, "bad_rate", str(e)) from None


def _check_wav_complete(body: bytes) -> None:
    """Walk the RIFF chunks to ``data``; refuse a data chunk cut short. A size of 0 or 0xFFFFFFFF
    (streaming writers that could not seek back) means "to the end" and passes."""
    pos = 12
    while pos + 8 <= len(body):
        cid, size = body[pos:pos + 4], struct.unpack("<I", body[pos + 4:pos + 8])[0]
        if cid == b"data":
            have = len(body) - pos - 8
            if size not in (0, 0xFFFFFFFF) and have < size:
                raise Rejected(400, "truncated_audio", f"truncated WAV: {have} of {size} data bytes")
            return
        pos += 8 + size + (size & 1)


def _decode_file(body: bytes, kind: str, target: int, max_audio_s: float) -> np.ndarray:
    if kind == "wav":
        _check_wav_complete(body)
    with tempfile.NamedTemporaryFile(suffix=f".{kind}", dir=_TMP) as f:
        f.write(body)
        f.flush()
        try:
            x = load_audio(f.name, target, convert=True)
        except AudioError as e:
            reason = str(e).replace(f.name, f"{kind.upper()} body")
            kind_ = "truncated_audio" if "truncated" in reason else "bad_audio"
            raise Rejected(400, kind_, reason) from None
    seconds = len(x) / target
    if seconds > max_audio_s:
        raise too_long(seconds, max_audio_s)
    return x


def decode_body(body: bytes, content_type: str | None, rate_param: str | None, target: int,
                max_audio_s: float) -> np.ndarray:
    """The body of ``POST /v1/recognize`` -> samples at ``target`` Hz, or Rejected (400/413/415)."""
    mime, params = parse_content_type(content_type)
    if not body:
        raise Rejected(400, "bad_audio", "empty body: send WAV, FLAC or 16-bit PCM")
    if mime == "audio/l16":
        rate = _rate(params.get("rate") or rate_param, "audio/l16 rate")
        big = params.get("endianness", "big-endian") != "little-endian"
        return to_rate(pcm16(body, big), rate, target, max_audio_s)
    if mime in PCM_TYPES and rate_param is not None:
        return to_rate(pcm16(body), _rate(rate_param, "?rate"), target, max_audio_s)
    sniffed = "wav" if body[:4] == b"RIFF" and body[8:12] == b"WAVE" else "flac" if body[:4] == b"fLaC" else None
    if mime in WAV_TYPES or mime in FLAC_TYPES or mime == "application/octet-stream":
        if sniffed is None:
            raise Rejected(400, "bad_audio", f"body is not WAV or FLAC (declared {mime}; starts {body[:4]!r})")
        return _decode_file(body, sniffed, target, max_audio_s)
    raise Rejected(415, "unsupported_media", f"content type {mime or '(none)'!r} not accepted: use audio/wav, "
                   "audio/flac, audio/l16;rate=R, or audio/pcm with ?rate=R")


def stream_pcm(pcm: bytes, samples_so_far: int, rate: int, limit: float) -> np.ndarray:
    """A stream's next 16-bit PCM message as samples, refused (413) when it takes the stream past
    ``serve.max_audio_s``."""
    x = pcm16(pcm)
    if (samples_so_far + len(x)) / rate > limit:
        raise too_long((samples_so_far + len(x)) / rate, limit)
    return x
