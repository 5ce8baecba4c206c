"""Export a checkpoint to ONNX and TorchScript, proving parity before the files are final.

    python -m hpc_asr export --checkpoint runs/demo/last.pt --data data/va/fbank/test \
        --out-dir runs/demo/export

Steps: trace with dynamic batch and time axes → ``onnx.checker`` → run ONNX Runtime and the
TorchScript module on real utterances (one at a time and as one padded batch, which exercises
the masks) → compare log-probs (max abs diff) and greedy transcripts with PyTorch. Files are
written into a hidden temporary directory that replaces ``--out-dir`` in one rename only when parity
holds (model, metadata, variants and LM together); otherwise only ``export.json`` is written and exit
code 1.

A streaming model (``model.streaming: true``) also gets ``streaming.onnx`` (``forward_chunk`` with
its caches, hpc_asr.deploy.streaming) at ``model.chunk_size``/``model.left_chunks``, gated the same
way: ONNX Runtime chunk by chunk against PyTorch's ``forward_chunk`` and chunk-masked forward.
Variants (hpc_asr.deploy.variants): ``--int8`` adds ``model.int8.onnx`` (and ``streaming.int8.onnx``),
compared with fp32 (reported: quantization moves the numbers on purpose; a frame agreement under
``INT8_MIN_FRAME_AGREEMENT`` means a broken graph and fails); ``--waveform`` adds ``model.wave.onnx``
(FBANK inside the graph), gated like model.onnx against prep's FBANK + model.onnx; ``--tensorrt`` adds
``model.fp16.plan`` (hpc_asr.deploy.tensorrt, greedy transcripts identical to model.onnx's), or, without
CUDA or the ``tensorrt`` package, records in ``export.json`` the command that builds it on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hpc_asr import checkpoint
from hpc_asr.atomic import AtomicFile, write_json_atomic
from hpc_asr.data.loader import FeatureSet
from hpc_asr.decode.ctc import file_sha256, greedy_batch
from hpc_asr.decode.evaluate import load_model_and_data
from hpc_asr.deploy.graph_io import INPUTS, OUTPUTS, pad_batch
from hpc_asr.deploy.streaming import OnnxStream, export_streaming_onnx, torch_stream
from hpc_asr.deploy.variants import WAVE_INPUTS, check_wave, export_wave_onnx, int8_agreement, quantize_int8
from hpc_asr.dist.launch import compute_threads
from hpc_asr.model import ConformerCTC

__all__ = ["check_parity", "check_streaming_parity", "export_onnx", "export_torchscript"]

INT8_MIN_FRAME_AGREEMENT = 0.5  # below this the int8 graph is broken, not merely quantized


def _example(num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Two different lengths so the tracer sees a real padding mask, not a constant.
    return torch.randn(2, 240, num_bins), torch.tensor([240, 180])


def export_onnx(model: ConformerCTC, path: Path, opset: int) -> None:
    """TorchScript-based exporter (dynamo=False): it needs no onnxscript and handles the
    data-independent forward with dynamic B and T."""
    feats, lens = _example(model.cmvn.mean.numel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (feats, lens), str(path), dynamo=False, opset_version=opset,
            input_names=INPUTS, output_names=OUTPUTS,
            dynamic_axes={"feats": {0: "B", 1: "T"}, "feat_lens": {0: "B"},
                          "log_probs": {0: "B", 1: "T_out"}, "out_lens": {0: "B"}},
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def export_torchscript(model: ConformerCTC, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, _example(model.cmvn.mean.numel()))
    traced.save(str(path))


def check_parity(model: ConformerCTC, tok, onnx_path: Path, ts_path: Path, data: FeatureSet,
                 max_utts: int, batch: int = 8) -> dict:
    """Compare PyTorch, ONNX Runtime and TorchScript on ``max_utts`` utterances of ``data``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ts = torch.jit.load(str(ts_path))
    n = min(max_utts, len(data))
    diffs = {"onnx": 0.0, "torchscript": 0.0}
    mismatches = {"onnx": [], "torchscript": []}
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        x, lens = pad_batch([data.feats(i) for i in idx])
        with torch.no_grad():
            ref_lp, ref_len = model(torch.from_numpy(x), torch.from_numpy(lens))
            ts_lp, ts_len = ts(torch.from_numpy(x), torch.from_numpy(lens))
        onnx_lp, onnx_len = sess.run(OUTPUTS, {"feats": x, "feat_lens": lens})
        ref_txt = greedy_batch(ref_lp, ref_len, tok)
        for name, lp, ln in (("onnx", torch.from_numpy(onnx_lp), torch.from_numpy(onnx_len)),
                             ("torchscript", ts_lp, ts_len)):
            if not torch.equal(ln.long(), ref_len.long()):
                raise RuntimeError(f"{name}: output lengths {ln.tolist()} != PyTorch {ref_len.tolist()}")
            for b, length in enumerate(ref_len.tolist()):  # compare valid frames only
                diffs[name] = max(diffs[name], float((lp[b, :length] - ref_lp[b, :length]).abs().max()))
            for i, a, h in zip(idx, ref_txt, greedy_batch(lp, ln, tok)):
                if a != h:
                    mismatches[name].append(data.ids[i])
    return {"utterances": n, "onnx_max_abs_diff": diffs["onnx"], "torchscript_max_abs_diff": diffs["torchscript"],
            "onnx_transcripts_match": not mismatches["onnx"],
            "torchscript_transcripts_match": not mismatches["torchscript"],
            "onnx_mismatched_ids": mismatches["onnx"][:20],
            "torchscript_mismatched_ids": mismatches["torchscript"][:20]}


def check_streaming_parity(model: ConformerCTC, tok, onnx_path: Path, data: FeatureSet, max_utts: int) -> dict:
    """ONNX Runtime chunk by chunk vs PyTorch ``forward_chunk`` chunk by chunk vs the chunk-masked
    full forward (the reference), on ``max_utts`` utterances of ``data``, one stream each."""
    stream = OnnxStream(onnx_path)
    chunk, left = int(stream.meta["chunk_size"]), int(stream.meta["left_chunks"])
    n = min(max_utts, len(data))
    diffs = {"onnx": 0.0, "torch": 0.0}
    mismatches = {"onnx": [], "torch": []}
    for i in range(n):
        x = data.feats(i)
        with torch.no_grad():
            ref, _ = model(torch.from_numpy(x)[None], torch.tensor([len(x)]), chunk=chunk, left_chunks=left)
            chunked = torch_stream(model, torch.from_numpy(x)[None], chunk, left)[0].numpy()
        ref = ref[0].numpy()
        want = greedy_batch(ref[None], [len(ref)], tok)[0]
        for name, lp in (("onnx", stream.utterance(x)), ("torch", chunked)):
            if lp.shape != ref.shape:
                raise RuntimeError(f"streaming {name}: {lp.shape[0]} frames for {data.ids[i]}, reference {len(ref)}")
            diffs[name] = max(diffs[name], float(np.abs(lp - ref).max()))
            if greedy_batch(lp[None], [len(lp)], tok)[0] != want:
                mismatches[name].append(data.ids[i])
    return {"utterances": n, "chunk_size": chunk, "left_chunks": left,
            "onnx_max_abs_diff": diffs["onnx"], "torch_chunked_max_abs_diff": diffs["torch"],
            "onnx_transcripts_match": not mismatches["onnx"], "torch_transcripts_match": not mismatches["torch"],
            "onnx_mismatched_ids": mismatches["onnx"][:20], "torch_mismatched_ids": mismatches["torch"][:20]}


def _streaming_gate(model: ConformerCTC, tok, cfg, data: FeatureSet, path: Path, max_utts: int) -> dict:
    """Write streaming.onnx at ``path`` (a temporary name) and run its parity gate."""
    meta = export_streaming_onnx(model, path, cfg.export.opset, cfg.model.chunk_size, cfg.model.left_chunks)
    res = check_streaming_parity(model, tok, path, data, max_utts)
    res["parity_ok"] = (res["onnx_max_abs_diff"] <= cfg.export.atol and res["onnx_transcripts_match"]
                        and res["torch_chunked_max_abs_diff"] <= cfg.export.atol and res["torch_transcripts_match"])
    return {**res, "metadata": meta}


def _int8_gate(model_tmp: Path, int8: AtomicFile, data: FeatureSet, tok, max_utts: int,
               stream_tmp: Path | None = None, stream_int8: AtomicFile | None = None) -> dict:
    """Quantize model.onnx (and streaming.onnx) and compare each with its fp32 graph."""
    import onnxruntime as ort

    quantize_int8(model_tmp, int8.tmp)
    n = min(max_utts, len(data))
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (int8.tmp, model_tmp)]
    pairs = []
    for i in range(n):
        x = np.asarray(data.feats(i), np.float32)
        feed = {"feats": x[None], "feat_lens": np.array([len(x)], np.int64)}
        (q, _), (f, ln) = (s.run(OUTPUTS, feed) for s in sessions)
        pairs.append((q[0, : int(ln[0])], f[0, : int(ln[0])]))
    res = {**int8_agreement(pairs, tok), "bytes": int8.tmp.stat().st_size, "fp32_bytes": model_tmp.stat().st_size}
    if stream_tmp is not None and stream_int8 is not None:
        quantize_int8(stream_tmp, stream_int8.tmp)
        q_s, f_s = OnnxStream(stream_int8.tmp), OnnxStream(stream_tmp)
        res["streaming"] = int8_agreement(
            [(q_s.utterance(data.feats(i)), f_s.utterance(data.feats(i))) for i in range(n)], tok)
    frames = [res["frame_agreement"], *([res["streaming"]["frame_agreement"]] if "streaming" in res else [])]
    res["parity_ok"] = min(frames) >= INT8_MIN_FRAME_AGREEMENT
    return res


def _variant_gates(args, model: ConformerCTC, tok, cfg, data: FeatureSet, onnx_tmp: Path,
                   extra: dict[str, SimpleNamespace]) -> dict:
    """The streaming graph and the ``--int8``/``--waveform`` variants, each through its gate."""
    out = {}
    if cfg.model.streaming:
        out["streaming"] = _streaming_gate(model, tok, cfg, data, extra["streaming.onnx"].tmp, args.max_utts)
    if args.int8:
        stream = extra["streaming.onnx"].tmp if cfg.model.streaming else None
        out["int8"] = _int8_gate(onnx_tmp, extra["model.int8.onnx"], data, tok, args.max_utts,
                                 stream, extra.get("streaming.int8.onnx"))
    if args.waveform:
        export_wave_onnx(model, cfg.features, extra["model.wave.onnx"].tmp, cfg.export.opset)
        wave = check_wave(extra["model.wave.onnx"].tmp, onnx_tmp, cfg.features, tok)
        out["waveform"] = {**wave, "parity_ok": wave["max_abs_diff"] <= cfg.export.atol and wave["transcripts_match"]}
    if args.tensorrt:
        from hpc_asr.deploy import tensorrt

        reason = tensorrt.unavailable()
        if reason:  # not a failure of the export: the engine is built where there is a GPU
            cmd = tensorrt.build_command(args.out_dir, args.data, args.max_utts)
            print(f"tensorrt: skipped ({reason}); on a GPU node run: {cmd}", file=sys.stderr)
            out["tensorrt"] = {"skipped": reason, "command": cmd}
        else:
            out["tensorrt"] = tensorrt.build_gated(onnx_tmp.parent, data, tok, args.max_utts)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="prepared features used for the parity check")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--max-utts", type=int, default=1000, help="utterances compared (default: all up to 1000)")
    p.add_argument("--int8", action="store_true", help="also model.int8.onnx (+ streaming.int8.onnx): dynamic int8")
    p.add_argument("--waveform", action="store_true", help="also model.wave.onnx: FBANK inside the graph")
    p.add_argument("--tensorrt", action="store_true",
                   help="also model.fp16.plan: a TensorRT FP16 engine (needs CUDA and tensorrt; else the command)")
    args = p.parse_args(argv)
    try:
        model, tok, cfg, data = load_model_and_data(args.checkpoint, args.data)
        if args.waveform and cfg.features.dither:
            raise ValueError(f"--waveform: features.dither={cfg.features.dither}; the FBANK graph needs dither 0")
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(compute_threads())  # the CPUs this job may use (affinity, OMP_NUM_THREADS), not the node's
    args.out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = AtomicFile(args.out_dir)  # the whole directory is built under a hidden name and renamed at once
    stage.tmp.mkdir()
    names = ["streaming.onnx"] * cfg.model.streaming + ["model.int8.onnx"] * args.int8 + [
        "streaming.int8.onnx"] * (args.int8 and cfg.model.streaming) + ["model.wave.onnx"] * args.waveform
    extra = {name: SimpleNamespace(tmp=stage.tmp / name) for name in names}  # inside the staged directory
    try:  # nothing is final until parity holds; then model, metadata, variants and LM appear together
        t0 = time.time()
        export_onnx(model, stage.tmp / "model.onnx", cfg.export.opset)
        export_torchscript(model, stage.tmp / "model.ts")
        res = check_parity(model, tok, stage.tmp / "model.onnx", stage.tmp / "model.ts", data, args.max_utts)
        res.update(opset=cfg.export.opset, atol=cfg.export.atol,
                   onnx_bytes=(stage.tmp / "model.onnx").stat().st_size, checkpoint=str(args.checkpoint))
        ok = (res["onnx_max_abs_diff"] <= cfg.export.atol and res["onnx_transcripts_match"]
              and res["torchscript_max_abs_diff"] <= cfg.export.atol and res["torchscript_transcripts_match"])
        variants = _variant_gates(args, model, tok, cfg, data, stage.tmp / "model.onnx", extra)  # each gated
        res.update(variants, wall_s=round(time.time() - t0, 2))
        res["parity_ok"] = ok = ok and all(v["parity_ok"] for v in variants.values() if "skipped" not in v)
        if not ok:
            args.out_dir.mkdir(exist_ok=True)
            write_json_atomic(args.out_dir / "export.json", res)  # the report only; no model files
            print(f"error: parity failed (atol {cfg.export.atol}): {json.dumps(res)}", file=sys.stderr)
            return 1
        (stage.tmp / "export.json").write_text(json.dumps(res, indent=1) + "\n")
        meta = {"tokenizer": tok.json_state(), "features": cfg.to_dict()["features"], "inputs": INPUTS,
                "outputs": OUTPUTS, "blank": tok.blank, "checkpoint_sha256": file_sha256(args.checkpoint),
                **({"streaming": {"file": "streaming.onnx", **res["streaming"]["metadata"]}}
                   if cfg.model.streaming else {}),
                **({"variants": {"int8": "model.int8.onnx" if args.int8 else None,
                                 "streaming_int8": "streaming.int8.onnx" if args.int8 and cfg.model.streaming else None,
                                 "waveform": {"file": "model.wave.onnx", "inputs": WAVE_INPUTS} if args.waveform
                                 else None}}
                   if args.int8 or args.waveform else {})}
        (stage.tmp / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
        lm_src = Path(args.checkpoint).parent / "lm"
        if (lm_src / "lm.arpa").is_file():  # the deployable unit carries its LM + tuned weights (latency, serving)
            shutil.copytree(lm_src, stage.tmp / "lm")
        stage.commit()  # fsync, then one rename: an export directory is complete or absent, never half
    finally:
        stage.discard()  # nothing left after a commit; the failed or interrupted export's files
    files = ["model.onnx", "model.ts", *names] + ["model.fp16.plan"] * (args.out_dir / "model.fp16.plan").is_file()
    print(f"[export] {args.out_dir}: {', '.join(files)}; {res['utterances']} utts, "
          f"max |Δ| onnx {res['onnx_max_abs_diff']:.2e} ts {res['torchscript_max_abs_diff']:.2e}, transcripts "
          "identical", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
