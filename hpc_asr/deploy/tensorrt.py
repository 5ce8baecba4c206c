"""A TensorRT FP16 engine built from an export directory's ``model.onnx``, gated on parity with it.

    python -m hpc_asr.deploy.tensorrt --model-dir runs/demo/export --data data/va/fbank/test

(``hpc-asr export ... --tensorrt`` runs the same steps inside the export.) Steps: read the inputs of
model.onnx and their dynamic axes (axis 0 is the batch, every other symbolic axis is time) → one
optimization profile (batch ``--batch`` min,opt,max, default 1,1,8; time ``--frames``, default the
shortest parity utterance, 300 frames = 3 s, the longest) → parse the ONNX graph with TensorRT 10's
``OnnxParser``, build with ``BuilderFlag.FP16`` → run the engine (torch CUDA tensors as buffers,
``execute_async_v3`` on a torch CUDA stream) against ONNX Runtime's ``model.onnx`` (already gated on
PyTorch) on the parity utterances, in padded batches of the profile's largest batch.

The gate: FP16 moves the numbers, so max |Δ log-prob| is reported, not bounded; the rule is the one
of ``model.onnx``'s gate — every greedy transcript identical — plus output lengths equal, and an
input the profile does not cover fails it. Only a passing engine is written: ``model.fp16.plan`` and
``tensorrt.json`` (TensorRT version, GPU, profile, the gate's numbers); ``export.json["tensorrt"]``
records the result either way. A plan runs only on the GPU model and TensorRT version that built it.
Without CUDA or the ``tensorrt`` package nothing is built: one line says why, exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from hpc_asr.atomic import atomic_path, write_json_atomic
from hpc_asr.data.loader import FeatureSet
from hpc_asr.data.tokenizer import from_state_dict as tokenizer_from_state
from hpc_asr.deploy.graph_io import OUTPUTS, pad_batch
from hpc_asr.deploy.variants import int8_agreement

__all__ = ["PLAN", "Engine", "build_command", "build_engine", "build_gated", "check_engine", "onnx_inputs",
           "profile_shapes", "unavailable"]

PLAN, META = "model.fp16.plan", "tensorrt.json"
OPT_FRAMES = 300  # 3 s at 10 ms: the profile's optimum, the bench's utterance


def unavailable() -> str | None:
    """Why no engine can be built on this machine, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not installed"
    return None


def build_command(model_dir: Path, data: str | Path, max_utts: int = 1000) -> str:
    """The command that builds and gates the engine from an existing export directory."""
    cmd = ["python", "-m", "hpc_asr.deploy.tensorrt", "--model-dir", str(Path(model_dir).resolve()),
           "--data", str(Path(data).resolve())] + (["--max-utts", str(max_utts)] if max_utts != 1000 else [])
    return shlex.join(cmd)


def onnx_inputs(onnx_path: Path) -> dict[str, list[int | str]]:
    """{input name: dims}, a symbolic dim as its name (``B``, ``T``), read from the ONNX graph."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {w.name for w in graph.initializer}
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.input if i.name not in weights}


def profile_shapes(inputs: dict[str, list[int | str]], batch: tuple[int, int, int],
                   frames: tuple[int, int, int]) -> dict[str, list[list[int]]]:
    """{name: [min, opt, max] shapes}: a fixed dim kept, axis 0 from ``batch``, other dynamic axes from ``frames``."""
    return {name: [[d if isinstance(d, int) and d > 0 else (batch[k] if axis == 0 else frames[k])
                    for axis, d in enumerate(dims)] for k in range(3)] for name, dims in inputs.items()}


@functools.cache
def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, shapes: dict[str, list[list[int]]]) -> bytes:
    """The serialized FP16 engine (TensorRT 10 API) for ``shapes``' one optimization profile."""
    import tensorrt as trt

    if not hasattr(trt.BuilderFlag, "FP16"):
        raise RuntimeError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (weakly typed precision flags were "
                           "removed); this builder is written for TensorRT 10 (env/setup-local.sh --gpu pins "
                           "tensorrt-cu12 10.x), or export an FP16 ONNX graph for a strongly typed build")
    builder = trt.Builder(_logger())
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return bytes(plan)


class Engine:
    """A deserialized plan: numpy inputs in (model.onnx's order), numpy outputs out, run on one
    torch CUDA stream with torch CUDA tensors as the engine's buffers."""

    def __init__(self, plan: bytes):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT cannot deserialize the plan (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.stream = torch.cuda.Stream()

    def _dtype(self, name: str):
        t, torch = self.trt.DataType, self.torch
        return {t.FLOAT: torch.float32, t.HALF: torch.float16, t.INT32: torch.int32, t.INT64: torch.int64,
                t.BOOL: torch.bool}[self.engine.get_tensor_dtype(name)]

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        torch, bufs = self.torch, {}
        with torch.cuda.stream(self.stream):  # the copies in, the engine and the copies out: one stream
            for name, a in zip(self.inputs, arrays, strict=True):
                bufs[name] = torch.from_numpy(np.ascontiguousarray(a)).to("cuda", self._dtype(name))
                if not self.context.set_input_shape(name, tuple(bufs[name].shape)):
                    lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                    raise ValueError(f"{name} {tuple(bufs[name].shape)} is outside the engine's profile "
                                     f"{tuple(lo)}..{tuple(hi)}")
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if min(shape, default=0) < 0:
                    raise RuntimeError(f"{name}: data-dependent shape {shape}; this runner needs static outputs")
                bufs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            for name, t in bufs.items():
                self.context.set_tensor_address(name, t.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
            out = [bufs[n].float() if bufs[n].dtype == torch.float16 else bufs[n] for n in self.outputs]
        self.stream.synchronize()
        return tuple(t.cpu().numpy() for t in out)


def check_engine(run, onnx_path: Path, data: FeatureSet, tok, max_utts: int, batch: int) -> dict:
    """``run(feats, feat_lens) -> (log_probs, out_lens)`` (an Engine) against ONNX Runtime's
    ``model.onnx`` on ``max_utts`` utterances of ``data`` in padded batches of ``batch``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    n, pairs, diff = min(max_utts, len(data)), [], 0.0
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        x, lens = pad_batch([data.feats(i) for i in idx])
        ref, ref_len = sess.run(OUTPUTS, {"feats": x, "feat_lens": lens})
        try:
            lp, out_len = run(x, lens)
        except (ValueError, RuntimeError) as e:  # e.g. an input the profile does not cover: a failure, reported
            return {"utterances": n, "parity_ok": False, "error": str(e)}
        if not np.array_equal(np.asarray(out_len).astype(np.int64), ref_len.astype(np.int64)):
            return {"utterances": n, "parity_ok": False,
                    "error": f"output lengths {np.asarray(out_len).tolist()} != model.onnx {ref_len.tolist()}"}
        for b, length in enumerate(ref_len.tolist()):
            pairs.append((lp[b, :length], ref[b, :length]))
            diff = max(diff, float(np.abs(lp[b, :length] - ref[b, :length]).max(initial=0.0)))
    res = {**int8_agreement(pairs, tok), "max_abs_diff": diff, "batch": batch}
    res["parity_ok"] = res["transcript_agreement"] == 1.0  # model.onnx's rule: every greedy transcript identical
    return res


def build_gated(model_dir: Path, data: FeatureSet, tok, max_utts: int, batch: tuple[int, int, int] = (1, 1, 8),
                frames: tuple[int, int, int] | None = None) -> dict:
    """Build the engine from ``model_dir/model.onnx``, gate it; write the plan and its JSON only if it passes."""
    import tensorrt as trt
    import torch

    onnx_path = model_dir / "model.onnx"
    if frames is None:
        lens = data.num_frames[: min(max_utts, len(data))].tolist() or [OPT_FRAMES]
        frames = (min(lens), min(max(OPT_FRAMES, min(lens)), max(lens)), max(lens))
    shapes = profile_shapes(onnx_inputs(onnx_path), batch, frames)
    t0 = time.time()
    plan = build_engine(onnx_path, shapes)
    report = {"file": PLAN, "precision": "fp16", "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0),
              "profile": shapes, "build_s": round(time.time() - t0, 1), "bytes": len(plan),
              **check_engine(Engine(plan), onnx_path, data, tok, max_utts, batch[2])}
    if report["parity_ok"]:
        with atomic_path(model_dir / PLAN) as tmp:
            tmp.write_bytes(plan)
        write_json_atomic(model_dir / META, report)
    return report


def _triple(text: str) -> tuple[int, int, int]:
    lo, opt, hi = (int(v) for v in text.split(","))
    if not 0 < lo <= opt <= hi:
        raise argparse.ArgumentTypeError(f"{text}: expected min,opt,max with 0 < min <= opt <= max")
    return lo, opt, hi


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, type=Path, help="an export directory (model.onnx, model.json)")
    p.add_argument("--data", required=True, help="prepared features for the parity gate (the export's --data)")
    p.add_argument("--max-utts", type=int, default=1000)
    p.add_argument("--batch", type=_triple, default=(1, 1, 8), help="profile batch min,opt,max (default 1,1,8)")
    p.add_argument("--frames", type=_triple, default=None,
                   help=f"profile time min,opt,max in frames (default: shortest, {OPT_FRAMES}, longest parity utt)")
    args = p.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"tensorrt: {reason}; nothing built (run this command on a GPU node with tensorrt installed)")
        return 2
    meta = json.loads((args.model_dir / "model.json").read_text())
    report = build_gated(args.model_dir, FeatureSet(args.data), tokenizer_from_state(meta["tokenizer"]),
                         args.max_utts, args.batch, args.frames)
    summary = json.dumps(report)
    if (args.model_dir / "export.json").is_file():  # the directory's record of its gates
        res = json.loads((args.model_dir / "export.json").read_text())
        write_json_atomic(args.model_dir / "export.json", {**res, "tensorrt": report})
    if not report["parity_ok"]:
        print(f"error: TensorRT FP16 parity failed: {summary}", file=sys.stderr)
        return 1
    print(f"[tensorrt] {args.model_dir / PLAN}: {report['utterances']} utts, max |Δ| {report['max_abs_diff']:.2e}, "
          f"frame agreement {report['frame_agreement']:.4f}, transcripts identical", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
