"""The same model in process, beside the service's load test (``hpc-asr bench serve``): our
Recognizer's speed against sherpa-onnx on the same network, against PyTorch eager from the
checkpoint the export came from, and the int8 variant's speed and WER cost; same utterances,
same threads."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from hpc_asr.decode.wer import error_counts, rates

__all__ = ["eager", "engines", "find_checkpoint", "int8"]


def engines(model_dir: Path, waves: list[np.ndarray], refs: list[str], threads: int,
             rate: int) -> tuple[dict, dict]:
    """Ours (Recognizer: FBANK + ONNX Runtime + greedy) vs sherpa-onnx on the same ONNX network,
    waveform -> text, one utterance at a time, ``threads`` threads each, best of 3 passes. Returns
    (results, {key: why it is null})."""
    import torch

    from hpc_asr.deploy import sherpa
    from hpc_asr.deploy.recognizer import Recognizer

    torch.set_num_threads(threads)  # our FBANK (torch) gets the same threads as both ONNX Runtime sessions
    ours = Recognizer(model_dir, threads=threads)
    audio_s = sum(len(w) for w in waves) / rate
    engines, why = {"ours": ours}, {}
    with tempfile.TemporaryDirectory() as tmp:
        try:  # model.onnx of any checkpoint, streaming or not, is the offline (full-context) graph
            sherpa.export_sherpa(model_dir, tmp)
            peer = sherpa.recognizer(tmp, threads=threads)
            engines["sherpa"] = lambda w: sherpa.transcribe(peer, w, rate)
        except Exception as e:  # recorded as null with the reason; the rest of the bench stands
            why["speedup_vs_sherpa_onnx"] = f"sherpa-onnx failed on this export: {type(e).__name__}: {e}"[:300]
        times = {k: [] for k in engines}
        hyps = {}
        for _ in range(3):
            for name, fn in engines.items():
                t0 = time.perf_counter()
                hyps[name] = [fn(w) for w in waves]
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    out = int8(model_dir, waves, refs, threads, best["ours"], hyps["ours"])
    rtf_key = "rtf_onnx_1thread" if threads == 1 else f"rtf_onnx_{threads}threads"
    out.update({rtf_key: round(best["ours"] / audio_s, 5),
                "wer_ours": round(rates(error_counts(refs, hyps["ours"]))[0], 4)})
    if "sherpa" in best:
        out.update({"rtf_sherpa_onnx": round(best["sherpa"] / audio_s, 5),
                    "speedup_vs_sherpa_onnx": round(best["sherpa"] / best["ours"], 3),
                    "wer_sherpa_onnx": round(rates(error_counts(refs, hyps["sherpa"]))[0], 4),
                    "transcripts_identical_to_sherpa": hyps["ours"] == hyps["sherpa"]})
    else:
        out.update(dict.fromkeys(("rtf_sherpa_onnx", "speedup_vs_sherpa_onnx", "wer_sherpa_onnx",
                                  "transcripts_identical_to_sherpa")))
    return out, why


def find_checkpoint(model_dir: Path, given: Path | None = None) -> tuple[Path | None, str]:
    """The checkpoint model.onnx was exported from: ``given``, else export.json's ``checkpoint``,
    ``../last.pt`` or ``../ckpt/last.pt``; each must hash to model.json's ``checkpoint_sha256``
    (a later training run may have overwritten last.pt). Returns (path or None, why not)."""
    from hpc_asr.decode.ctc import file_sha256

    want = json.loads((model_dir / "model.json").read_text()).get("checkpoint_sha256")
    report = model_dir / "export.json"
    recorded = json.loads(report.read_text()).get("checkpoint") if report.is_file() else None
    cands = [given] if given else [Path(recorded)] * bool(recorded) + [model_dir.parent / "last.pt",
                                                                       model_dir.parent / "ckpt" / "last.pt"]
    tried = []
    for c in cands:
        if c.is_file() and (want is None or file_sha256(c) == want):
            return c, ""
        tried.append(f"{c} ({'other weights' if c.is_file() else 'absent'})")
    return None, "needs the checkpoint model.onnx came from (--checkpoint); tried " + ", ".join(tried)


def eager(model_dir: Path, ckpt: Path, waves: list[np.ndarray], threads: int) -> dict:
    """ONNX Runtime (model.onnx) vs PyTorch eager (the checkpoint, full context: a streaming model's
    ``forward(chunk=0)`` in eval mode is what model.onnx holds), the same FBANK, one utterance at a
    time, ``threads`` threads each, best of 3 passes."""
    import torch

    from hpc_asr.checkpoint import load_model
    from hpc_asr.deploy.recognizer import Recognizer

    torch.set_num_threads(threads)
    rec = Recognizer(model_dir, threads=threads)
    model = load_model(ckpt)[0]
    feats = [rec.features_of(w) for w in waves]

    def onnx_pass():
        return [rec.session.run(None, {"feats": f[None], "feat_lens": np.array([len(f)], np.int64)})[0][0]
                for f in feats]

    def eager_pass():
        with torch.inference_mode():
            return [model(torch.from_numpy(f)[None], torch.tensor([len(f)]))[0][0].numpy() for f in feats]

    times, outs = {"onnx": [], "eager": []}, {}
    for _ in range(3):
        for name, fn in (("onnx", onnx_pass), ("eager", eager_pass)):
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(outs["onnx"], outs["eager"]))
    return {"onnx_vs_eager_speedup": round(min(times["eager"]) / min(times["onnx"]), 3),
            "onnx_vs_eager_max_abs_diff": diff, "eager_checkpoint": str(ckpt),
            "eager_streaming_checkpoint": bool(model.cfg.streaming)}


def int8(model_dir: Path, waves: list[np.ndarray], refs: list[str], threads: int, fp32_s: float,
          fp32_hyps: list[str]) -> dict:
    """``model.int8.onnx`` (``hpc-asr export --int8``) against model.onnx, same path, best of 3."""
    from hpc_asr.deploy.recognizer import Recognizer

    if not (model_dir / "model.int8.onnx").is_file():
        return {}
    q = Recognizer(model_dir, threads=threads, model_file="model.int8.onnx")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        hyps = [q(w) for w in waves]
        times.append(time.perf_counter() - t0)
    wer = {k: rates(error_counts(refs, h))[0] for k, h in (("fp32", fp32_hyps), ("int8", hyps))}
    return {"int8_speedup": round(fp32_s / min(times), 3), "int8_wer_cost": round(wer["int8"] - wer["fp32"], 4),
            "wer_int8": round(wer["int8"], 4)}
