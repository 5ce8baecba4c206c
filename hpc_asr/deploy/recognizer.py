"""The deployable unit over an export directory: FBANK settings + ONNX Runtime session + the
tokenizer the model was trained with + a CTC decoder (greedy, beam, beam+lm), waveform -> text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpc_asr.config import FeatureConfig
from hpc_asr.data.features import fbank
from hpc_asr.data.tokenizer import from_state_dict as tokenizer_from_state
from hpc_asr.decode.ctc import DECODERS, BeamDecoder, greedy_ids, lm_files

__all__ = ["Recognizer"]


class Recognizer:
    """The deployable unit: FBANK settings + ONNX session + tokenizer, from an export directory."""

    def __init__(self, model_dir: str | Path, threads: int = 1, decoder: str = "greedy", lm: str | None = None,
                 providers: list[str] | None = None, inter_threads: int = 1, beam_size: int = 32,
                 hotwords: tuple[str, ...] = (), hotword_score: float = 0.0, model_file: str = "model.onnx",
                 token_beam: int = 0):
        import onnxruntime as ort

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / "model.json").read_text())
        self.features = FeatureConfig(**meta["features"])
        self.tokenizer = tokenizer_from_state(meta["tokenizer"])  # char or BPE, as trained
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = inter_threads
        self.session = ort.InferenceSession(str(model_dir / model_file), opts,  # or a variant: model.int8.onnx
                                            providers=providers or ["CPUExecutionProvider"])
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r}: expected one of {', '.join(DECODERS)}")
        self.decoder = decoder
        self.beam = None if decoder == "greedy" else BeamDecoder(
            self.tokenizer, beam_size, token_beam=token_beam,
            lm=lm_files(lm or model_dir / "lm", model_sha256=meta.get("checkpoint_sha256"))
            if decoder == "beam+lm" else None,
            **({"hotwords": hotwords, "hotword_score": hotword_score} if decoder == "beam+lm" else {}))

    def features_of(self, samples: np.ndarray) -> np.ndarray:
        return fbank(samples, self.features)

    def decode_features(self, feats: np.ndarray) -> str:
        lp, ln = self.session.run(None, {"feats": feats[None], "feat_lens": np.array([len(feats)], np.int64)})
        return self.decode_log_probs(lp[0, : int(ln[0])])

    def decode_log_probs(self, log_probs: np.ndarray) -> str:
        """(T', V) log-probabilities of one utterance (valid frames only) -> text, with this decoder."""
        if self.beam is not None:
            return self.beam.decode_one(log_probs)
        return self.tokenizer.decode(greedy_ids(log_probs, len(log_probs), self.tokenizer.blank))

    def __call__(self, samples: np.ndarray) -> str:
        return self.decode_features(self.features_of(samples))
