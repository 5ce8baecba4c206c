"""CTC decoders on hand-built posteriors: prefix beam search agrees with greedy where it must and
beats it where path sums matter; the LM and the lexicon fix what acoustics cannot; hotwords."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_asr.data.tokenizer import CharTokenizer
from hpc_asr.decode.ctc import BeamDecoder, LmFiles, greedy_batch, lm_files, make_decoder
from hpc_asr.decode.ngram import build_arpa

TOK = CharTokenizer()
V = TOK.vocab_size


def posterior(frames: list[dict[str, float]], floor: float = 1e-4) -> np.ndarray:
    """(T, V) log-probs from per-frame {symbol: prob} ('_' = blank); the rest share ``floor``."""
    p = np.full((len(frames), V), floor)
    for t, f in enumerate(frames):
        for s, v in f.items():
            p[t, 0 if s == "_" else TOK.encode(s)[0] if s != " " else TOK.symbols.index(" ") + 1] = v
    p /= p.sum(1, keepdims=True)
    return np.log(p).astype(np.float32)


def spell(text: str, p: float = 0.9, confuse: dict[int, dict[str, float]] | None = None) -> list[dict]:
    """One frame per character and a blank between, optionally with confusions at positions."""
    frames = []
    for i, c in enumerate(text):
        frames += [(confuse or {}).get(i, {c: p}), {"_": 0.9}]
    return frames


def test_beam_equals_greedy_when_each_frame_has_a_clear_winner():
    """With one dominant label per frame (> 0.5), the most probable labelling is the greedy one."""
    rng = np.random.default_rng(0)
    dec = BeamDecoder(TOK, beam_size=16)
    for _ in range(20):
        t = int(rng.integers(5, 60))
        x = rng.standard_normal((t, V)) + 9 * np.eye(V)[rng.integers(0, V, t)]
        lp = (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)
        assert dec.decode_one(lp) == greedy_batch(lp[None], np.array([t]), TOK)[0]


def test_prefix_beam_sums_paths_greedy_cannot():
    """Two frames with p(blank)=0.6, p(a)=0.4: greedy says '' (0.36), but 'a' has 0.64 over paths."""
    lp = posterior([{"_": 0.6, "a": 0.4}] * 2, floor=1e-9)
    assert greedy_batch(lp[None], np.array([2]), TOK) == [""]
    assert BeamDecoder(TOK, beam_size=8).decode_one(lp) == "a"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    texts = ["set a timer for ten minutes", "set a timer for two minutes", "call mom", "call bob now",
             "play some jazz", "turn the lights off", "what time is it"] * 5
    build_arpa(texts, 3, d / "lm.arpa")
    return d


def test_lexicon_and_lm_fix_a_misspelling(lm_dir):
    """'set a timar': the acoustics prefer 'a' over 'e'; only the LM's words are allowed."""
    text = "set a timer"
    lp = posterior(spell(text, confuse={9: {"a": 0.6, "e": 0.4}}))
    assert greedy_batch(lp[None], np.array([len(lp)]), TOK) == ["set a timar"]
    assert BeamDecoder(TOK, 16, lm=LmFiles(lm_dir / "lm.arpa", lm_weight=0.5)).decode_one(lp) == text


def test_lm_weight_decides_between_two_words_the_acoustics_cannot(lm_dir):
    """'call mom' vs 'call bob' equally likely acoustically for 'call ?o?', then 'now' follows:
    the trigram (call bob now) decides only when the LM has weight."""
    frames = spell("call ")
    frames += [{"m": 0.5, "b": 0.5}, {"_": 0.9}, {"o": 0.9}, {"_": 0.9}, {"m": 0.51, "b": 0.49}, {"_": 0.9}]
    frames += spell(" now")
    lp = posterior(frames)
    dec = BeamDecoder(TOK, 32, lm=LmFiles(lm_dir / "lm.arpa"), lm_weight=0.0, word_score=0.0)
    no_lm = dec.decode_one(lp)
    dec.set_weights(1.0, 0.0)
    assert dec.decode_one(lp) == "call bob now"
    assert no_lm != "call bob now"


def test_hotword_biasing_recognises_a_contact_name(lm_dir):
    """A contact name the LM never saw ('zoe') is only in the output when it is a hotword."""
    frames = [*spell("call "), {"z": 0.5, "b": 0.5}, {"_": 0.9}, {"o": 0.9}, {"_": 0.9}, {"e": 0.5, "b": 0.5}]
    lp = posterior(frames)
    plain = BeamDecoder(TOK, 32, lm=LmFiles(lm_dir / "lm.arpa", lm_weight=0.5)).decode_one(lp)
    biased = BeamDecoder(TOK, 32, lm=LmFiles(lm_dir / "lm.arpa", lm_weight=0.5), hotwords=("zoe",),
                         hotword_score=8.0).decode_one(lp)
    assert "zoe" not in plain
    assert biased == "call zoe"


def test_token_beam_tries_only_each_frames_best_tokens(lm_dir):
    """'set a timer' where the frame of the 'e' ranks it third (after 'a' and 'o'): with every
    token tried (0) or the best three the lexicon recovers the sentence; with the best two the
    'e' is never tried, so the output differs."""
    text = "set a timer"
    lp = posterior(spell(text, confuse={9: {"a": 0.5, "o": 0.3, "e": 0.2}}))
    lm = LmFiles(lm_dir / "lm.arpa", lm_weight=0.5)
    assert BeamDecoder(TOK, 16, lm=lm).decode_one(lp) == text
    assert BeamDecoder(TOK, 16, lm=lm, token_beam=3).decode_one(lp) == text
    assert BeamDecoder(TOK, 16, lm=lm, token_beam=2).decode_one(lp) != text
    assert BeamDecoder(TOK, 16, lm=lm, token_beam=10 * V).token_beam == V  # capped at the vocabulary


def test_tuned_weights_are_read_from_decode_json(lm_dir):
    assert not lm_files(lm_dir).tuned
    (lm_dir / "decode.json").write_text('{"lm_weight": 0.7, "word_score": 1.5}')
    try:
        lm = lm_files(lm_dir / "lm.arpa")
        assert (lm.lm_weight, lm.word_score, lm.tuned) == (0.7, 1.5, True)
    finally:
        (lm_dir / "decode.json").unlink()


def test_bad_decoder_and_missing_lm_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="decoder 'viterbi'"):
        make_decoder("viterbi", TOK)
    with pytest.raises(ValueError, match="needs a language model"):
        make_decoder("beam+lm", TOK)
    with pytest.raises(FileNotFoundError, match=r"lm\.arpa"):
        lm_files(tmp_path)


def test_empty_posterior_decodes_to_empty():
    assert BeamDecoder(TOK, 4).decode_one(np.zeros((0, V), np.float32)) == ""


def test_bpe_tokenizer_decodes_with_and_without_lm(tmp_path):
    """BPE marks word starts inside its pieces; the blank stands in as the word separator."""
    from hpc_asr.data.tokenizer import train_bpe

    texts = ["set a timer for ten minutes", "call mom", "play some jazz", "turn the lights off"] * 20
    tok = train_bpe(texts, 40)
    build_arpa(texts, 2, tmp_path / "lm.arpa")
    ids = tok.encode("call mom")
    p = np.full((2 * len(ids), tok.vocab_size), 1e-4)
    for t, i in enumerate(ids):
        p[2 * t, i], p[2 * t + 1, 0] = 0.9, 0.9
    lp = np.log(p / p.sum(1, keepdims=True)).astype(np.float32)
    assert BeamDecoder(tok, 16).decode_one(lp) == "call mom"
    assert BeamDecoder(tok, 16, lm=LmFiles(tmp_path / "lm.arpa")).decode_one(lp) == "call mom"


# ---- evaluate's decoder: the LM it picks, hotwords from the config, batches ------------------

def _ckpt_beside_an_lm(root, texts) -> str:
    """A checkpoint path (the file is only hashed) with ``lm/lm.arpa`` beside it, as training leaves it."""
    (root / "run").mkdir(parents=True)
    (root / "run" / "last.pt").write_bytes(b"")
    build_arpa(texts, 2, root / "run" / "lm" / "lm.arpa")
    return str(root / "run" / "last.pt")


def test_evaluate_picks_the_lm_from_the_option_then_the_config_then_beside_the_checkpoint(tmp_path):
    from hpc_asr.config import Config
    from hpc_asr.decode.evaluate import build_decoder

    ckpt = _ckpt_beside_an_lm(tmp_path, ["call mom"])
    for name in ("cfg", "opt"):
        build_arpa(["call bob"], 2, tmp_path / name / "lm.arpa")
    cfg = Config()
    assert build_decoder("beam+lm", TOK, cfg, None, ckpt)[1]["lm"] == str(tmp_path / "run" / "lm" / "lm.arpa")
    cfg.decode.lm = str(tmp_path / "cfg")
    assert build_decoder("beam+lm", TOK, cfg, None, ckpt)[1]["lm"] == str(tmp_path / "cfg" / "lm.arpa")
    info = build_decoder("beam+lm", TOK, cfg, str(tmp_path / "opt" / "lm.arpa"), ckpt)[1]  # --lm wins
    assert info["lm"] == str(tmp_path / "opt" / "lm.arpa") and info["decoder"] == "beam+lm"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_decoder("beam+lm", TOK, cfg, str(tmp_path / "nowhere"), ckpt)


def test_evaluate_takes_hotwords_from_the_config(tmp_path):
    """decode.hotwords reaches the beam search: the contact name only comes out when it is listed."""
    from hpc_asr.config import Config
    from hpc_asr.decode.evaluate import build_decoder

    ckpt = _ckpt_beside_an_lm(tmp_path, ["call mom", "call bob now", "play some jazz"] * 3)
    lp = posterior([*spell("call "), {"z": 0.5, "b": 0.5}, {"_": 0.9}, {"o": 0.9}, {"_": 0.9}, {"e": 0.5, "b": 0.5}])
    cfg = Config()
    plain, _ = build_decoder("beam+lm", TOK, cfg, None, ckpt)
    cfg.decode.hotwords, cfg.decode.hotword_score = "alice, zoe", 8.0
    biased, _ = build_decoder("beam+lm", TOK, cfg, None, ckpt)
    n = np.array([len(lp)])
    assert "zoe" not in plain(lp[None], n)[0] and biased(lp[None], n) == ["call zoe"]


def test_batch_beam_decode_equals_one_by_one(lm_dir):
    """A padded batch of posteriors of different lengths decodes as each one alone (padding unread)."""
    texts = ["set a timer", "call mom", "play some jazz"]
    one = [posterior(spell(t, confuse={1: {t[1]: 0.6, "x": 0.4}})) for t in texts]
    longest = max(len(p) for p in one)
    batch = np.stack([np.pad(p, ((0, longest - len(p)), (0, 0)), constant_values=np.log(1.0 / V)) for p in one])
    lens = np.array([len(p) for p in one])
    for kind, lm in (("beam", None), ("beam+lm", lm_files(lm_dir))):
        dec = make_decoder(kind, TOK, beam_size=16, lm=lm)
        assert dec(batch, lens) == [dec(p[None], np.array([len(p)]))[0] for p in one]
    assert make_decoder("beam+lm", TOK, beam_size=16, lm=lm_files(lm_dir))(batch, lens) == texts


def test_loading_the_arpa_lm_prints_nothing(lm_dir, capfd):
    """KenLM's "build a binary file" hint and progress ruler went to stderr on every evaluation."""
    capfd.readouterr()
    BeamDecoder(TOK, 16, lm=LmFiles(lm_dir / "lm.arpa", lm_weight=0.5))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_decode_json_is_tied_to_its_lm_and_checkpoint(tmp_path, capsys):
    """decode.json records the SHA-256 of the ARPA file and the checkpoint it was tuned for. Another
    LM under the same name is refused (the weights scale that LM's scores); another checkpoint is a
    warning (best.pt/avg.pt of the same run usually want the same weights) and is reported."""
    from hpc_asr.decode.ctc import file_sha256, write_tuned

    build_arpa(["call mom", "play jazz"], 2, tmp_path / "lm.arpa")
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"model one")
    out = write_tuned(tmp_path / "lm.arpa", {"lm_weight": 0.7, "word_score": 1.5}, ckpt)
    assert not list(tmp_path.glob(".decode.json.tmp*"))
    lm = lm_files(tmp_path, model_sha256=file_sha256(ckpt))
    assert (lm.lm_weight, lm.word_score, lm.tuned, lm.tuned_on_this_model) == (0.7, 1.5, True, True)
    assert capsys.readouterr().err == ""

    other = lm_files(tmp_path, model_sha256=file_sha256(out))  # any other model
    assert (other.lm_weight, other.tuned_on_this_model) == (0.7, False)
    err = capsys.readouterr().err
    assert f"warning: {out}: tuned with another checkpoint" in err and "lm tune" in err

    build_arpa(["call mom", "play jazz", "stop"], 2, tmp_path / "lm.arpa")  # re-built LM, stale weights
    with pytest.raises(ValueError, match=r"decode\.json: tuned for another LM \(arpa_sha256 ") as e:
        lm_files(tmp_path / "lm.arpa")
    assert "lm tune" in str(e.value) and "\n" not in str(e.value)
