"""The model behind the service: the export's Recognizer (FBANK settings, tokenizer, decoder) on
the ONNX Runtime provider the config asks for, run on padded batches, plus word times; and, where
the export has ``streaming.onnx`` (and ``serve.streaming`` is not ``off``), the streaming graph
that the WebSocket streams feed chunk by chunk (``chunked``). ``run_items`` is the batcher's one
run: offline feature matrices and streams' ``ChunkJob``s, each kind batched with its own kind.

Word times come from the greedy path (the frame where each token is first emitted; a word ends
one output frame after its last token); the beam decoders return words without frames, so their
responses omit ``words``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpc_asr.config import DecodeConfig, ServeConfig
from hpc_asr.data.features import AudioError
from hpc_asr.decode.ctc import greedy_ids
from hpc_asr.deploy.recognizer import Recognizer
from hpc_asr.deploy.serve.chunked import ChunkJob, run_chunks
from hpc_asr.deploy.serve.limits import Rejected

__all__ = ["Backend", "greedy_words", "providers_for"]


def providers_for(choice: str) -> list[str]:
    """ONNX Runtime providers for ``serve.provider`` (auto: CUDA where this onnxruntime has it)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if choice == "cuda" and "CUDAExecutionProvider" not in have:
        raise RuntimeError(f"serve.provider=cuda but onnxruntime offers only {have} (install onnxruntime-gpu)")
    if choice == "cuda" or (choice == "auto" and "CUDAExecutionProvider" in have):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Backend:
    """Recognizer + batch runs + word times, loaded from an export directory."""

    def __init__(self, model_dir: str | Path, serve: ServeConfig, decode: DecodeConfig):
        hot = tuple(w.strip() for w in decode.hotwords.split(",") if w.strip())
        self.rec = Recognizer(model_dir, threads=serve.intra_threads, decoder=decode.decoder, lm=decode.lm or None,
                              providers=providers_for(serve.provider), inter_threads=serve.inter_threads,
                              beam_size=decode.beam_size, token_beam=decode.token_beam,
                              hotwords=hot, hotword_score=decode.hotword_score)
        self.features = self.rec.features
        self.sample_rate = self.features.sample_rate
        self.providers = self.rec.session.get_providers()
        probe = 400  # input frames; the output length tells the subsampling (and warms the session up)
        (out,) = self.run_batch([np.zeros((probe, self.features.num_mel_bins), np.float32)])
        self.output_frame_s = probe / max(1, len(out)) * self.features.frame_shift_ms / 1000
        self.stream = None  # OnnxStream over streaming.onnx: streams in chunks ("chunked"), else "redecode"
        path = Path(model_dir) / "streaming.onnx"
        if serve.streaming == "auto" and path.is_file():
            from hpc_asr.deploy.streaming import OnnxStream

            self.stream = OnnxStream(path, serve.intra_threads, providers_for(serve.provider))
        self.mode = "chunked" if self.stream is not None else "redecode"
        self.chunk_ms = None if self.stream is None else self.stream.shift * self.features.frame_shift_ms

    def run_items(self, items: list) -> list:
        """The batcher's run: feature matrices -> (text, words) by one padded offline run; ChunkJobs
        -> (text, words) after feeding their windows (``run_chunks``): the configured decoder for
        a final, greedy for a partial."""
        out: list = [None] * len(items)
        jobs = [i for i, x in enumerate(items) if isinstance(x, ChunkJob)]
        feats = [i for i, x in enumerate(items) if not isinstance(x, ChunkJob)]
        if feats:
            for i, lp in zip(feats, self.run_batch([items[i] for i in feats])):
                out[i] = self.decode(lp)
        if jobs:
            run_chunks(self.stream, [items[i] for i in jobs])
            for i in jobs:
                job = items[i]
                lp = np.concatenate(job.log_probs) if job.log_probs else np.zeros((0, 1), np.float32)
                out[i] = self.decode(lp) if job.final else (self.greedy_text(lp), None)
        return out

    def greedy_text(self, log_probs: np.ndarray) -> str:
        tok = self.rec.tokenizer
        return tok.decode(greedy_ids(log_probs, len(log_probs), tok.blank)) if len(log_probs) else ""

    def featurize(self, samples: np.ndarray) -> np.ndarray:
        """(N,) samples at the model's rate -> (T, bins) FBANK, as prep computes it."""
        try:
            return self.rec.features_of(samples)
        except AudioError as e:
            raise Rejected(400, "bad_audio", f"audio too short: {e}") from None

    def run_batch(self, feats: list[np.ndarray]) -> list[np.ndarray]:
        """Feature matrices -> each one's valid (T', V) log-probs, from one padded ONNX run."""
        lens = np.array([len(f) for f in feats], np.int64)
        x = np.zeros((len(feats), int(lens.max()), feats[0].shape[1]), np.float32)
        for i, f in enumerate(feats):
            x[i, : len(f)] = f
        lp, out_lens = self.rec.session.run(None, {"feats": x, "feat_lens": lens})
        return [lp[i, : int(n)] for i, n in enumerate(out_lens)]

    def decode(self, log_probs: np.ndarray) -> tuple[str, list[dict] | None]:
        """(T', V) -> (text, word times or None where the decoder gives none)."""
        text = self.rec.decode_log_probs(log_probs)
        if self.rec.beam is not None:
            return text, None
        words = greedy_words(log_probs, self.rec.tokenizer, self.output_frame_s)
        return text, (words if " ".join(w["word"] for w in words) == text else None)


def _piece(tokenizer, i: int) -> str:
    """A token's surface: a character, or a sentencepiece piece (``▁`` starts a word)."""
    symbols = getattr(tokenizer, "symbols", None)
    return symbols[i - 1] if symbols is not None else tokenizer.sp.id_to_piece(i - 1)


def greedy_words(log_probs: np.ndarray, tokenizer, frame_s: float) -> list[dict]:
    """Words of the greedy path with start/end seconds: [{"word", "start", "end"}]."""
    best = np.asarray(log_probs).argmax(-1)
    words: list[dict] = []
    current: dict | None = None
    for t, i in enumerate(best.tolist()):
        if i == tokenizer.blank or (t > 0 and best[t - 1] == i):
            continue
        piece = _piece(tokenizer, i)
        if piece.isspace() or piece.startswith("▁"):
            current = None
            piece = piece.lstrip("▁").strip()
            if not piece:
                continue
        if current is None:
            current = {"word": "", "start": round(t * frame_s, 3), "end": 0.0}
            words.append(current)
        current["word"] += piece
        current["end"] = round((t + 1) * frame_s, 3)
    return words
