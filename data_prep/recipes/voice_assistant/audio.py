"""Synthesizer output → corpus audio: a synthesizer process run and its WAV decoded, resampled to
16 kHz as prep resamples (`hpc_asr.data.features.resample`, soxr), trimmed, padded, levelled,
optionally noised, and written as 16-bit PCM with its manifest row."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np

from data_prep.recipes.voice_assistant.plan import Utt
from hpc_asr.data.features import resample

__all__ = ["SAMPLE_RATE", "finish", "parse_wav", "postprocess", "run_synthesizer", "trim_silence", "write_wav"]

SAMPLE_RATE = 16000
TIMEOUT_S = 60      # one synthesizer process, one utterance


def run_synthesizer(cmd: list[str], text: str | None = None) -> bytes:
    """Run one synthesizer process (``text`` on its stdin) and return its stdout; a failure raises
    RuntimeError naming the program, its exit status and the start of its stderr."""
    res = subprocess.run(cmd, input=None if text is None else text.encode(), capture_output=True, check=False,
                         stdin=subprocess.DEVNULL if text is None else None, timeout=TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exit {res.returncode}: {res.stderr.decode(errors='replace').strip()[:200]}")
    return res.stdout


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode 16-bit PCM WAV bytes as written by ``espeak-ng --stdout``, ``mbrola - -.wav`` or
    ``RHVoice-test -o -``.

    These stream, so their RIFF/data sizes are placeholders (0x7fffffff, or 0); the data chunk
    is taken to run to the end of the bytes instead of trusting its size.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV stream")
    pos, rate, bits, channels = 12, None, None, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if tag == b"fmt ":
            channels = int.from_bytes(data[body + 2:body + 4], "little")
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            bits = int.from_bytes(data[body + 14:body + 16], "little")
        elif tag == b"data":
            if rate is None or bits != 16:
                raise ValueError(f"unsupported WAV format (bits={bits})")
            pcm = data[body:]
            pcm = pcm[:len(pcm) - len(pcm) % (2 * channels)]
            x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            return x.reshape(-1, channels).mean(axis=1), rate
        pos = body + size + (size & 1)
    raise ValueError("WAV stream has no data chunk")


def trim_silence(x: np.ndarray, keep_s: float = 0.03) -> np.ndarray:
    """Cut the synthesizer's own leading/trailing silence (espeak-ng: about 0.25 s + 0.6 s, a third
    of a short command) so the padding below is the only silence, and training spends no compute
    on it."""
    env = np.convolve(x * x, np.ones(160, np.float32) / 160, mode="same")
    loud = np.flatnonzero(env > max(float(env.max()) * 1e-4, 1e-9))
    if loud.size == 0:
        return x
    keep = int(keep_s * SAMPLE_RATE)
    return x[max(loud[0] - keep, 0): loud[-1] + keep + 1]


def postprocess(x: np.ndarray, utt: Utt, seed: int) -> np.ndarray:
    """Pad with silence, set the peak level and maybe add noise, deterministically per utt."""
    peak = float(np.max(np.abs(x)))
    x = x * (utt.peak / peak)
    lead, trail = int(utt.lead * SAMPLE_RATE), int(utt.trail * SAMPLE_RATE)
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(trail, np.float32)])
    if utt.snr_db is not None:
        rng = np.random.default_rng([seed, utt.index])
        speech_rms = float(np.sqrt(np.mean(x[lead:len(x) - trail] ** 2)))
        noise_rms = speech_rms / (10 ** (utt.snr_db / 20))
        x = x + rng.standard_normal(len(x)).astype(np.float32) * noise_rms
    return np.clip(x, -1.0, 1.0)


def write_wav(path: Path, x: np.ndarray) -> None:
    """16 kHz mono 16-bit PCM via the standard library."""
    pcm = np.round(x * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())



def finish(utt: Utt, x: np.ndarray, rate: int, out: Path, seed: int) -> dict:
    """Synthesizer samples at ``rate`` → trimmed, padded, levelled 16 kHz file and its manifest row
    (with ``engine`` and ``voice``), or {"id", "split", "error"} instead of raising."""
    try:
        x = resample(x, rate, SAMPLE_RATE, utt.id)
        if len(x) < SAMPLE_RATE // 20 or float(np.max(np.abs(x), initial=0.0)) < 1e-4:
            raise RuntimeError("empty audio")
        x = postprocess(trim_silence(x), utt, seed)
        rel = Path("wav") / utt.split / f"{utt.id}.wav"
        write_wav(out / rel, x)
    except Exception as exc:
        return {"id": utt.id, "split": utt.split, "error": f"{type(exc).__name__}: {exc}"}
    return {"id": utt.id, "split": utt.split, "audio": rel.as_posix(), "duration": round(len(x) / SAMPLE_RATE, 4),
            "text": utt.text, "speaker": utt.speaker, "engine": utt.engine, "voice": utt.voice}
