"""CTC decoding: greedy, prefix beam search, and beam search with a word n-gram LM.

``greedy``: best label per frame, merge repeats, drop blanks. ``beam``: CTC prefix beam search
over the tokenizer's units (paths that collapse to the same prefix are summed). ``beam+lm``:
beam search constrained to a lexicon of words, scored by a KenLM n-gram model with a weight and a
per-word insertion bonus (shallow fusion), optionally biased toward hotwords (contact names).

The searches are flashlight-text's C++ decoders (the ones behind ``torchaudio.models.decoder
.ctc_decoder``): a prebuilt wheel that bundles KenLM, so nothing compiles at set-up, and they
read the ARPA files that ``hpc_asr.decode.ngram`` writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_asr.atomic import write_json_atomic

__all__ = ["DECODERS", "BeamDecoder", "LmFiles", "file_sha256", "greedy_batch", "greedy_ids", "lm_files",
           "make_decoder", "write_tuned"]

DECODERS = ("greedy", "beam", "beam+lm")


def greedy_ids(log_probs: np.ndarray, length: int, blank: int = 0) -> list[int]:
    """(T, V) scores of one utterance → label ids."""
    best = np.asarray(log_probs[:length]).argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(i) for i in best[keep] if i != blank]


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def greedy_batch(log_probs, lengths, tokenizer) -> list[str]:
    """(B, T, V) scores (torch or numpy) + (B,) lengths → transcripts."""
    lp, ln = _numpy(log_probs), _numpy(lengths)
    return [tokenizer.decode(greedy_ids(lp[b], int(ln[b]), tokenizer.blank)) for b in range(lp.shape[0])]


@dataclass
class LmFiles:
    """An ARPA model and the decoder weights tuned for it on dev (``decode.json`` beside it)."""

    arpa: Path
    lm_weight: float = 0.5
    word_score: float = 0.0
    tuned: bool = False
    tuned_on_this_model: bool | None = None  # None: no model given to compare with, or not tuned


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_tuned(arpa: Path, result: dict, checkpoint: str | Path) -> Path:
    """``decode.json`` beside ``arpa``: the tuning ``result`` (lm_weight, word_score, dev WERs)
    tied to the SHA-256 of the ARPA file and of the checkpoint it was tuned with. Atomic."""
    out = arpa.parent / "decode.json"
    write_json_atomic(out, {**result, "arpa_sha256": file_sha256(arpa), "checkpoint_sha256": file_sha256(checkpoint)})
    return out


def lm_files(path: str | Path, model_sha256: str | None = None) -> LmFiles:
    """``path`` is an ARPA file or a directory holding ``lm.arpa``; tuned weights come from
    ``decode.json`` next to it when present.

    ``decode.json`` tuned for another ARPA file is refused (ValueError): the weights scale that
    LM's scores and mean nothing for this one. Tuned with another checkpoint than ``model_sha256``
    (the model about to decode) is a warning on stderr and ``tuned_on_this_model`` False: the
    weights still belong to this LM, and best.pt, avg.pt or a later checkpoint of the same run
    usually want nearly the same ones, so refusing would block their evaluation; re-tune to be sure."""
    p = Path(path)
    arpa = p / "lm.arpa" if p.is_dir() else p
    if not arpa.is_file():
        raise FileNotFoundError(f"{arpa}: language model not found (build it with python -m hpc_asr lm)")
    out = LmFiles(arpa)
    tuned = arpa.parent / "decode.json"
    if not tuned.is_file():
        return out
    d = json.loads(tuned.read_text())
    retune = f"re-run `hpc-asr lm tune --lm {arpa} ...`, or delete {tuned} to decode with the default weights"
    if "arpa_sha256" not in d:
        print(f"warning: {tuned}: written before decode.json recorded its LM and model; {retune}", file=sys.stderr)
    elif d["arpa_sha256"] != file_sha256(arpa):
        raise ValueError(f"{tuned}: tuned for another LM (arpa_sha256 {d['arpa_sha256'][:12]}, {arpa} is "
                         f"{file_sha256(arpa)[:12]}): {retune}")
    if model_sha256 is not None and "checkpoint_sha256" in d:
        out.tuned_on_this_model = d["checkpoint_sha256"] == model_sha256
        if not out.tuned_on_this_model:
            print(f"warning: {tuned}: tuned with another checkpoint (sha256 {d['checkpoint_sha256'][:12]}, this "
                  f"model's is {model_sha256[:12]}); the weights may be stale: {retune}", file=sys.stderr)
    out.lm_weight, out.word_score, out.tuned = float(d["lm_weight"]), float(d["word_score"]), True
    return out


def _sil_index(tokenizer) -> int:
    """The word separator: the space of the character vocabulary; BPE marks word starts inside
    its pieces, so the blank stands in (it never appears inside a spelling)."""
    symbols = getattr(tokenizer, "symbols", None)
    return symbols.index(" ") + 1 if symbols and " " in symbols else tokenizer.blank


def _spell(tokenizer, word: str) -> list[int]:
    return [i for i in tokenizer.encode(word) if i != _sil_index(tokenizer)]


class BeamDecoder:
    """CTC prefix beam search, with a word LM when ``lm`` is given.

    ``beam_size`` hypotheses survive each frame; ``beam_threshold`` prunes those that many
    log-units below the best; ``token_beam`` (0: every token) extends each hypothesis by
    only that frame's best tokens, which lets a wide beam stay fast (the demo: 4096 and 12).
    With an LM the score of a word sequence W is
    log p_ctc(W) + lm_weight * ln p_lm(W) + word_score * |W|, and the output is restricted to
    the LM's words plus ``hotwords`` (which get ``hotword_score`` extra per occurrence)."""

    def __init__(self, tokenizer, beam_size: int = 32, beam_threshold: float = 25.0,
                 lm: LmFiles | None = None, lm_weight: float | None = None, word_score: float | None = None,
                 hotwords: tuple[str, ...] = (), hotword_score: float = 0.0, token_beam: int = 0):
        from flashlight.lib.text import decoder as fl

        self.tok, self.fl = tokenizer, fl
        self.sil = _sil_index(tokenizer)
        self.beam_size, self.beam_threshold = beam_size, beam_threshold
        self.token_beam = min(token_beam or tokenizer.vocab_size, tokenizer.vocab_size)
        self.lm = lm
        if lm is None:
            opts = fl.LexiconFreeDecoderOptions(beam_size, self.token_beam, beam_threshold, 0.0, 0.0,
                                                True, fl.CriterionType.CTC)
            self._decoder = fl.LexiconFreeDecoder(opts, fl.ZeroLM(), self.sil, tokenizer.blank, [])
            return
        self.lm_weight = lm.lm_weight if lm_weight is None else lm_weight
        self.word_score = lm.word_score if word_score is None else word_score
        self._build_lexicon(hotwords, hotword_score)

    def _build_lexicon(self, hotwords: tuple[str, ...], hotword_score: float) -> None:
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary

        from hpc_asr.decode.ngram import UNK, read_arpa

        fl = self.fl
        words = read_arpa(self.lm.arpa).words
        extra = [w for w in dict.fromkeys(hotwords) if w and w not in set(words)]
        self.words = [*words, *extra, UNK]
        wdict = Dictionary()
        for w in self.words:
            wdict.add_entry(w)
        with _kenlm_hint_filtered():
            self._kenlm = KenLM(str(self.lm.arpa), wdict)
        start = self._kenlm.start(False)
        self.trie = fl.Trie(self.tok.vocab_size, self.sil)
        hot = set(hotwords)
        for i, w in enumerate(self.words[:-1]):
            spelling = _spell(self.tok, w)
            if spelling:
                _, score = self._kenlm.score(start, i)
                self.trie.insert(spelling, i, score + (hotword_score if w in hot else 0.0))
        self.trie.smear(fl.SmearingMode.MAX)
        self._hot = {self.words.index(w) for w in hot if w in self.words}
        self._hotword_score = hotword_score
        self._make()

    def _make(self) -> None:
        fl = self.fl
        opts = fl.LexiconDecoderOptions(self.beam_size, self.token_beam, self.beam_threshold, self.lm_weight,
                                        self.word_score, -math.inf, 0.0, True, fl.CriterionType.CTC)
        lm = self._kenlm
        if self._hot and self._hotword_score:  # the decoder multiplies LM scores by lm_weight
            lm = _biased_lm(fl, self._kenlm, self._hot, self._hotword_score / max(self.lm_weight, 1e-3))
        self._lm_ref = lm  # a Python LM must outlive the C++ decoder that calls it
        self._decoder = fl.LexiconDecoder(opts, self.trie, lm, self.sil, self.tok.blank,
                                          len(self.words) - 1, [], False)

    def set_weights(self, lm_weight: float, word_score: float) -> None:
        """Re-tune without rebuilding the lexicon (the grid search in ``hpc_asr.decode.ngram tune``)."""
        self.lm_weight, self.word_score = lm_weight, word_score
        self._make()

    def decode_one(self, log_probs: np.ndarray) -> str:
        """(T, V) log-probabilities of one utterance → transcript."""
        em = np.ascontiguousarray(log_probs, dtype=np.float32)
        if em.shape[0] == 0:
            return ""
        best = self._decoder.decode(em.ctypes.data, em.shape[0], em.shape[1])[0]
        if self.lm is None:
            ids = [t for i, t in enumerate(best.tokens) if t >= 0 and (i == 0 or t != best.tokens[i - 1])]
            return self.tok.decode([t for t in ids if t != self.tok.blank])
        return " ".join(self.words[w] for w in best.words if w >= 0)

    def decode_batch(self, log_probs, lengths) -> list[str]:
        lp, ln = _numpy(log_probs), _numpy(lengths)
        return [self.decode_one(lp[b, : int(ln[b])]) for b in range(lp.shape[0])]


@contextlib.contextmanager
def _kenlm_hint_filtered():
    """KenLM writes "Loading the LM will be faster if you build a binary file." (and a progress
    ruler) to the C-level stderr on every ARPA load: swallow exactly that, pass anything else on."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
    hint = ("Loading the LM will be faster if you build a binary file.", "Reading ", "----5---10",
            "****************************************************************************************************")
    rest = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(hint)]
    if rest:
        print("\n".join(rest), file=sys.stderr)


def _biased_lm(fl, base, hot: set[int], bonus: float):
    """KenLM ``base`` plus ``bonus`` whenever a word in ``hot`` is scored (flashlight's LM base
    class is imported lazily, so the subclass is made here)."""

    class BiasedLM(fl.LM):
        """KenLM plus a constant bonus (in LM units) whenever a hotword is scored."""

        def __init__(self, base, hot: set[int], bonus: float):
            fl.LM.__init__(self)
            self.base, self.hot, self.bonus = base, hot, bonus

        def start(self, start_with_nothing):
            return self.base.start(start_with_nothing)

        def score(self, state, idx):
            st, s = self.base.score(state, idx)
            return st, s + (self.bonus if idx in self.hot else 0.0)

        def finish(self, state):
            return self.base.finish(state)

    return BiasedLM(base, hot, bonus)


def make_decoder(kind: str, tokenizer, beam_size: int = 32, lm: LmFiles | None = None, **kw):
    """A callable ``(log_probs (B,T,V), lengths (B,)) -> [str]`` for ``kind`` in DECODERS."""
    if kind not in DECODERS:
        raise ValueError(f"decoder {kind!r}: expected one of {', '.join(DECODERS)}")
    if kind == "greedy":
        kw.pop("token_beam", None)
        return lambda lp, ln: greedy_batch(lp, ln, tokenizer)
    if kind == "beam+lm" and lm is None:
        raise ValueError("decoder beam+lm needs a language model (--lm DIR or ARPA)")
    return BeamDecoder(tokenizer, beam_size, lm=lm if kind == "beam+lm" else None, **kw).decode_batch
