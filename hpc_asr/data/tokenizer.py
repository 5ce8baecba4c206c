"""Character vocabulary for CTC. Index 0 is the blank; the symbol list travels in checkpoints."""

from __future__ import annotations

from hpc_asr.data.text import normalize  # the one normaliser; re-exported for callers of tokenizer.normalize

__all__ = ["BpeTokenizer", "CharTokenizer", "from_state_dict", "normalize", "train_bpe"]

DEFAULT_SYMBOLS = list(" 'abcdefghijklmnopqrstuvwxyz")


class CharTokenizer:
    blank = 0

    def __init__(self, symbols: list[str] | None = None):
        self.symbols = list(symbols or DEFAULT_SYMBOLS)
        if len(set(self.symbols)) != len(self.symbols) or any(len(s) != 1 for s in self.symbols):
            raise ValueError(f"tokenizer symbols must be distinct single characters, got {self.symbols}")
        self._ids = {s: i + 1 for i, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols) + 1

    def encode(self, text: str) -> list[int]:
        """Characters outside the vocabulary are dropped after normalisation."""
        return [self._ids[c] for c in normalize(text) if c in self._ids]

    def decode(self, ids) -> str:
        return "".join(self.symbols[i - 1] for i in ids if 0 < i <= len(self.symbols)).strip()

    def state_dict(self) -> dict:
        return {"type": "char", "symbols": self.symbols}

    def json_state(self) -> dict:
        return self.state_dict()

    @classmethod
    def from_state_dict(cls, state: dict) -> CharTokenizer:
        if state.get("type") != "char":
            raise ValueError(f"unknown tokenizer type {state.get('type')!r}")
        return cls(state["symbols"])


class BpeTokenizer:
    """Sentencepiece BPE over normalised text. Index 0 is the CTC blank (sentencepiece's id i
    becomes i + 1); the serialized model proto travels in checkpoints as bytes."""

    blank = 0

    def __init__(self, proto: bytes):
        import sentencepiece as spm

        self.proto = bytes(proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + 1

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(normalize(text))]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) - 1 for i in ids if 0 < int(i) < self.vocab_size]).strip()

    def state_dict(self) -> dict:
        return {"type": "bpe", "model_proto": self.proto}

    def json_state(self) -> dict:
        """The state with the proto as base64 text, for JSON sidecars (export metadata)."""
        import base64

        return {"type": "bpe", "model_proto_b64": base64.b64encode(self.proto).decode()}


def train_bpe(texts: list[str], vocab_size: int) -> BpeTokenizer:
    """Train BPE on the normalised transcripts. The vocabulary is capped at what the text
    supports, so small corpora (tests) still train."""
    import io

    import sentencepiece as spm

    lines = [t for t in (normalize(x) for x in texts) if t]
    if not lines:
        raise ValueError("cannot train a BPE tokenizer: no training transcripts")
    buf = io.BytesIO()
    cap = max(len(set("".join(lines))) + 2, min(vocab_size, 4 * len(set(" ".join(lines).split())) + 30))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=min(vocab_size, cap),
        character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    return BpeTokenizer(buf.getvalue())


def from_state_dict(state: dict):
    """The tokenizer a checkpoint (or a JSON sidecar: ``json_state``) was saved with."""
    kind = state.get("type")
    if kind == "char":
        return CharTokenizer.from_state_dict(state)
    if kind == "bpe":
        if "model_proto_b64" in state:
            import base64

            return BpeTokenizer(base64.b64decode(state["model_proto_b64"]))
        return BpeTokenizer(state["model_proto"])
    raise ValueError(f"unknown tokenizer type {kind!r}")
