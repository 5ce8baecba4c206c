"""Our export as a sherpa-onnx ``wenet_ctc`` model, so the peer runtime can load the same network.

    hpc-asr export-sherpa --model-dir runs/demo/export --out-dir runs/demo/sherpa
    (python -m hpc_asr.deploy.sherpa ...)

sherpa-onnx's offline ``wenet_ctc`` binds the graph by position: ``x (N, T, 80) f32, x_lens (N)
i64 -> log_probs (N, T', V), log_probs_lens (N) i64``; it reads the metadata ``model_type=wenet_ctc``,
``vocab_size`` and ``subsampling_factor`` (a missing key aborts the load), and ``tokens.txt`` (one
``symbol id`` a line, the blank named ``<blk>``, ``▁`` for a space). Our ONNX graph already has
that shape with CMVN inside, so the adapter renames the inputs and outputs, adds the metadata and
writes the tokens: the weights are untouched (a parity check compares the two graphs).

Features: sherpa computes kaldi-native-fbank on samples x 32768 and no CMVN, which is our scale
(``hpc_asr.data.features`` applies Kaldi's int16 scale too) and our CMVN is in the graph. Its
``from_wenet_ctc`` helper uses its own defaults, ``high_freq=-400`` (mel banks to 7600 Hz instead of
our Nyquist) and ``snip_edges=False`` (one more frame, edges reflected); ``recognizer()`` below
builds the config by hand with the model's own ``model.json`` features instead, so the two front
ends agree. What cannot be set: sherpa 2.x dithers wenet_ctc input (dither 1.0 on the int16 scale,
i.e. ~3e-5 of full scale), where our prep uses dither 0; on audio with any noise floor the
transcripts agree (tests/test_serve.py), on digitally silent stretches the features differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hpc_asr.config import FeatureConfig

__all__ = ["export_sherpa", "recognizer", "tokens_txt"]

NAMES = {"feats": "x", "feat_lens": "x_lens", "log_probs": "log_probs", "out_lens": "log_probs_lens"}


def tokens_txt(tokenizer_state: dict) -> str:
    """sherpa's symbol table: ``<blk> 0``, then each unit with our id (space as ``▁``)."""
    from hpc_asr.data.tokenizer import from_state_dict

    tok = from_state_dict(tokenizer_state)
    symbols = getattr(tok, "symbols", None)
    if symbols is not None:
        units = ["▁" if s == " " else s for s in symbols]
    else:
        units = [tok.sp.id_to_piece(i) for i in range(tok.sp.get_piece_size())]
    return "".join(f"{u} {i}\n" for i, u in enumerate(["<blk>", *units]))


def _subsampling(session) -> int:
    probe = 400
    feats = np.zeros((1, probe, session.get_inputs()[0].shape[2] or 80), np.float32)
    _, out_lens = session.run(None, {session.get_inputs()[0].name: feats,
                                     session.get_inputs()[1].name: np.array([probe], np.int64)})
    return round(probe / int(out_lens[0]))


def export_sherpa(model_dir: str | Path, out_dir: str | Path) -> dict:
    """``model_dir`` (model.onnx + model.json) -> ``out_dir/model.onnx`` + ``tokens.txt``; returns
    the metadata written. Parity with the source graph is checked on random features first."""
    import onnx
    import onnxruntime as ort

    from hpc_asr.atomic import atomic_path, write_json_atomic

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    src = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    m = onnx.load(str(model_dir / "model.onnx"))
    for v in [*m.graph.input, *m.graph.output]:
        if v.name not in NAMES:
            raise ValueError(f"{model_dir / 'model.onnx'}: unexpected graph value {v.name!r}; expected {list(NAMES)}")
    for node in m.graph.node:
        node.input[:] = [NAMES.get(n, n) for n in node.input]
        node.output[:] = [NAMES.get(n, n) for n in node.output]
    for v in [*m.graph.input, *m.graph.output]:
        v.name = NAMES[v.name]
    vocab = int(src.get_outputs()[0].shape[2]) if isinstance(src.get_outputs()[0].shape[2], int) else None
    vocab = vocab or len(tokens_txt(meta["tokenizer"]).splitlines())
    props = {"model_type": "wenet_ctc", "version": "1", "vocab_size": str(vocab),
             "subsampling_factor": str(_subsampling(src)), "comment": "hpc_asr export (hpc_asr.deploy.sherpa)",
             "features": json.dumps(meta["features"])}
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.onnx") as tmp:  # renamed only when parity holds
        onnx.save(m, str(tmp))
        _check_parity(src, tmp)
    with atomic_path(out_dir / "tokens.txt") as tmp:
        tmp.write_text(tokens_txt(meta["tokenizer"]))
    write_json_atomic(out_dir / "features.json", meta["features"])
    return props


def _check_parity(src, path: Path) -> None:
    import onnxruntime as ort

    dst = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = (3 + 2 * rng.standard_normal((2, 157, 80))).astype(np.float32)
    lens = np.array([157, 101], np.int64)
    a_lp, a_len = src.run(None, {"feats": x, "feat_lens": lens})
    b_lp, b_len = dst.run(None, {"x": x, "x_lens": lens})
    if not (np.array_equal(a_len, b_len) and np.array_equal(a_lp, b_lp)):
        raise RuntimeError(f"{path}: renamed graph differs from the source (lengths {a_len} vs {b_len})")


def recognizer(sherpa_dir: str | Path, threads: int = 1, features: FeatureConfig | None = None):
    """A sherpa-onnx OfflineRecognizer over ``export_sherpa``'s output, with the front end set to the
    model's own FBANK settings (``features.json`` beside it) rather than sherpa's defaults."""
    import sherpa_onnx as so

    d = Path(sherpa_dir)
    f = features or FeatureConfig(**json.loads((d / "features.json").read_text()))
    model = so.OfflineModelConfig(wenet_ctc=so.OfflineWenetCtcModelConfig(model=str(d / "model.onnx")),
                                  tokens=str(d / "tokens.txt"), num_threads=threads, provider="cpu",
                                  model_type="wenet_ctc")
    feat = so.FeatureExtractorConfig(sampling_rate=f.sample_rate, feature_dim=f.num_mel_bins, low_freq=f.low_freq,
                                     high_freq=f.high_freq, dither=f.dither, normalize_samples=False,
                                     snip_edges=True)
    rec = so.OfflineRecognizer.__new__(so.OfflineRecognizer)
    cfg = so.OfflineRecognizerConfig(feat_config=feat, model_config=model, decoding_method="greedy_search")
    from sherpa_onnx.offline_recognizer import _Recognizer

    rec.recognizer, rec.config = _Recognizer(cfg), cfg
    return rec


def transcribe(rec, samples: np.ndarray, sample_rate: int) -> str:
    """One utterance through a sherpa-onnx recognizer."""
    s = rec.create_stream()
    s.accept_waveform(sample_rate, samples)
    rec.decode_stream(s)
    return s.result.text.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, type=Path, help="an export directory (model.onnx + model.json)")
    p.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args(argv)
    for name in ("model.onnx", "model.json"):
        if not (args.model_dir / name).is_file():
            print(f"error: {args.model_dir / name}: not found", file=sys.stderr)
            return 2
    props = export_sherpa(args.model_dir, args.out_dir)
    print(f"[export-sherpa] {args.out_dir}/model.onnx + tokens.txt: {props}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
