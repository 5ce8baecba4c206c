"""Training benchmarks: ``make bench-train`` → ``runs/bench/train.json`` and ``runs/bench/scaling.png``.

    python -m hpc_asr bench train --out runs/bench/train.json

Ratios measured in one run on this machine, against a peer measured in the same run:

- ``weak_scaling_efficiency_horovod`` / ``_torch``: step time of one plain process (engine
  ``none``, no communication: the same baseline for both engines; Horovod at size 1 registers no
  hooks while DDP at size 1 still buckets and compresses, so per-engine 1-rank runs are not the
  same baseline) / step time on 2 ranks (real ``mpirun``, one thread per rank, the same per-rank
  batch); 1.0 is perfect. The runs alternate ``--repeats`` times and the medians are compared (a
  shared box drifts between runs); the timed runs have no Horovod timeline.
- ``fp16_allreduce_bytes_ratio``: gradient bytes Horovod reduced with fp16 compression / without,
  read from the Horovod timeline of two real 2-rank runs (dtype and shape of every allreduce).
- ``speedup_vs_torchaudio_conformer``: see ``hpc_asr.bench_torchaudio`` (a side environment).
- ``predicted_speedup``: the seed preset on 8…128 A100 (``hpc_asr.bench.scaling``), inputs marked
  measured or assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hpc_asr.atomic import write_json_atomic

__all__ = ["main", "timeline_allreduce_bytes"]

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8, "uint8": 1, "int8": 1}
ROOT = Path(__file__).resolve().parents[2]


def timeline_allreduce_bytes(path: str | Path) -> dict[str, int]:
    """Bytes per dtype of the gradient allreduces in a Horovod timeline (rank 0's; Chrome-trace JSON).
    DistributedOptimizer names each by its parameter; unnamed ones ("allreduce.noname.N") are
    metrics and are left out."""
    events = json.loads(Path(path).read_text())
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and "name" in e.get("args", {})}
    out: dict[str, int] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("ph") == "E" and "dtype" in args and _is_gradient(names.get(e["pid"], "")):
            numel = 1
            for d in json.loads(args["shape"]):
                numel *= int(d)
            out[args["dtype"]] = out.get(args["dtype"], 0) + numel * DTYPE_BYTES[args["dtype"]]
    return out


def _is_gradient(tensor_name: str) -> bool:
    return tensor_name.startswith("allreduce.") and not tensor_name.startswith("allreduce.noname")


# ---- worker: runs under mpirun, one process per rank ----------------------------------------

def worker(a: argparse.Namespace) -> int:
    from hpc_asr.config import DistConfig
    from hpc_asr.dist.engines import make_engine

    engine = make_engine(DistConfig(engine=a.engine, compression=a.compression, timeline=a.timeline or ""))
    import torch
    from torch import nn

    from hpc_asr.config import ModelConfig
    from hpc_asr.model import ConformerCTC

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=a.d_model, n_heads=4, n_layers=a.layers, conv_kernel=15, conv_norm="batch",
                      subsampling="conv1d", dropout=0.1, vocab_size=29)
    model = ConformerCTC(cfg).to(engine.device)
    ddp = engine.wrap_model(model)
    opt = engine.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model, accum_steps=1)
    engine.broadcast_state(model, opt)
    g = torch.Generator().manual_seed(engine.world.rank)  # each rank its own batch, same shape
    frames = int(a.utt_seconds * 100)
    feats = torch.randn(a.batch, frames, 80, generator=g).to(engine.device)
    lens = torch.full((a.batch,), frames, device=engine.device)
    targets = torch.randint(1, 29, (a.batch, frames // 20), generator=g).to(engine.device)
    ctc = nn.CTCLoss(zero_infinity=True)
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            engine.barrier()  # dist: time the steps from a common start ...
            t0 = time.perf_counter()
        log_probs, out_lens = ddp(feats, lens)
        loss = ctc(log_probs.transpose(0, 1), targets, out_lens, torch.full_like(lens, targets.shape[1]))
        loss.backward()
        engine.synchronize(opt)  # dist: same order as hpc_asr.train
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        with engine.skip_synchronize(opt):
            opt.step()
        opt.zero_grad()
    engine.barrier()  # dist: ... to a common end
    mean = (time.perf_counter() - t0) / a.steps
    step = engine.allreduce_sum(torch.tensor([mean], dtype=torch.float64))  # dist: mean over ranks
    if engine.world.is_main:
        Path(a.result).write_text(json.dumps({"engine": engine.name, "ranks": engine.world.size,
                                              "step_s": float(step[0]) / engine.world.size,
                                              "params": model.num_params(), "compression": a.compression}))
    engine.barrier()
    engine.shutdown()
    return 0


# ---- torchaudio comparison: runs inside the side environment --------------------------------

def comparison_models(d_model: int, layers: int) -> dict:
    """Our Conformer (abs and rel attention) and ``torchaudio.models.Conformer`` at equal width,
    depth, FFN and kernel, behind the same front end (CMVN + conv1d subsampling + sinusoids) and
    CTC head. Needs torchaudio (the side environment here; the GPU set-up on GPU nodes)."""
    import torch
    import torchaudio
    from torch import nn

    from hpc_asr.config import ModelConfig
    from hpc_asr.model import ConformerCTC, _sinusoids

    cfg = ModelConfig(d_model=d_model, n_heads=4, n_layers=layers, ff_mult=4, conv_kernel=15, conv_norm="batch",
                      subsampling="conv1d", dropout=0.1, vocab_size=29)

    class TorchaudioCTC(nn.Module):
        def __init__(self):
            super().__init__()
            ours = ConformerCTC(cfg)
            self.cmvn, self.subsample, self.drop, self.ctc = ours.cmvn, ours.subsample, ours.drop, ours.ctc
            self.encoder = torchaudio.models.Conformer(cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model,
                                                       cfg.n_layers, cfg.conv_kernel, dropout=cfg.dropout)

        def forward(self, feats, lengths):
            x, lengths = self.subsample(self.cmvn(feats), lengths)
            x = self.drop(x * cfg.d_model**0.5 + _sinusoids(x.shape[1], cfg.d_model, x.device))
            x, lengths = self.encoder(x, lengths)
            return torch.log_softmax(self.ctc(x), dim=-1), lengths

    rel = ModelConfig(**{**vars(cfg), "attention": "rel"})
    return {"ours": ConformerCTC(cfg), "ours_rel": ConformerCTC(rel), "torchaudio": TorchaudioCTC()}


def torchaudio_worker(a: argparse.Namespace) -> int:
    """Interleaved train steps of our Conformer and torchaudio's at equal dims; prints one JSON line."""
    import torch
    import torchaudio

    torch.set_num_threads(a.threads)
    models = comparison_models(a.d_model, a.layers)
    result = {"torch": torch.__version__, "torchaudio": torchaudio.__version__, "threads": a.threads,
              "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}, "cases": {}}
    for dtype in ("fp32", "bf16"):
        for secs in (3.0, 10.0):
            result["cases"][f"{dtype}_{secs:g}s"] = interleaved_steps(models, dtype, secs, a.batch, a.steps, a.warmup)
    result.update(geomeans(result["cases"]))
    print(json.dumps(result))
    return 0


def geomeans(cases: dict) -> dict:
    import math

    out = {}
    for key, suffix in (("ratio", ""), ("ratio_rel", "_rel")):
        vals = [c[key] for c in cases.values()]
        out[f"ratio{suffix}_geomean"] = math.exp(sum(math.log(v) for v in vals) / len(vals))
    return out


def interleaved_steps(models: dict, dtype: str, secs: float, batch: int, steps: int, warmup: int,
                      device: str = "cpu") -> dict:
    """Median train-step seconds per model, the models alternating step by step (on CUDA each
    step is timed between synchronisations)."""
    import statistics

    import torch

    g = torch.Generator().manual_seed(0)
    frames = int(secs * 100)
    feats, lens = torch.randn(batch, frames, 80, generator=g), torch.full((batch,), frames)
    targets = torch.randint(1, 29, (batch, frames // 20), generator=g)
    feats, lens, targets = feats.to(device), lens.to(device), targets.to(device)
    models = {k: m.to(device) for k, m in models.items()}
    fused = {"fused": True} if device == "cuda" else {}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, **fused) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        for name, model in models.items():
            model.train()
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                lp, out_lens = model(feats, lens)
            loss = torch.nn.functional.ctc_loss(lp.float().transpose(0, 1), targets, out_lens,
                                                torch.full_like(lens, targets.shape[1]), zero_infinity=True)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_step_s": round(v, 5) for k, v in med.items()},
            "ratio": med["torchaudio"] / med["ours"],  # > 1: ours is faster
            "ratio_rel": med["torchaudio"] / med["ours_rel"]}


# ---- orchestration (plain python) -------------------------------------------------------------

SIDE_ENV = Path.home() / ".cache" / "hpc_asr" / "side-torchaudio"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for key in [k for k in env if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "HOROVOD_", "MASTER_"))]:
        env.pop(key)
    return env


def _sizes(a: argparse.Namespace) -> list[str]:
    return ["--d-model", str(a.d_model), "--layers", str(a.layers), "--batch", str(a.batch),
            "--utt-seconds", str(a.utt_seconds), "--steps", str(a.steps), "--warmup", str(a.warmup)]


def run_ranks(a: argparse.Namespace, tmp: Path, engine: str, np: int, compression: str = "fp16",
              timeline: Path | None = None) -> dict:
    """One real ``mpirun -np NP`` of the worker; returns rank 0's result."""
    result = tmp / f"{engine}-{np}-{compression}.json"
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(np), sys.executable, "-m", "hpc_asr",
           "bench", "train", "--worker", "--engine", engine, "--compression", compression,
           "--result", str(result), *(["--timeline", str(timeline)] if timeline else []), *_sizes(a)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(result.read_text())


def weak_scaling(a: argparse.Namespace, tmp: Path) -> dict:
    """``a.repeats`` rounds of: one plain process (engine ``none``: the step with no
    communication at all, the baseline of both engines) and 2 ranks of each engine; medians
    compared. Then the fp16 and fp32 wire bytes from two untimed runs with the Horovod timeline."""
    samples: dict[str, list[float]] = {"none": [], "horovod": [], "torch": []}
    for _ in range(a.repeats):
        samples["none"].append(run_ranks(a, tmp, "none", 1)["step_s"])
        for engine in ("horovod", "torch"):
            samples[engine].append(run_ranks(a, tmp, engine, 2)["step_s"])
    one = statistics.median(samples["none"])
    out: dict = {"samples_1_rank": [round(x, 4) for x in samples["none"]]}
    for engine in ("horovod", "torch"):
        two = statistics.median(samples[engine])
        out[engine] = {"step_s_1_rank": round(one, 4), "step_s_2_ranks": round(two, 4),
                       "efficiency": round(one / two, 3), "samples_2_ranks": [round(x, 4) for x in samples[engine]]}
    timelines = {c: tmp / f"timeline-{c}.json" for c in ("fp16", "none")}
    for compression, path in timelines.items():
        run_ranks(a, tmp, "horovod", 2, compression=compression, timeline=path)
    fp16, fp32 = (timeline_allreduce_bytes(p) for p in timelines.values())
    out["fp16_bytes"] = {"compressed": fp16, "uncompressed": fp32,
                         "ratio": round(sum(fp16.values()) / sum(fp32.values()), 4)}
    return out


def torchaudio_comparison(a: argparse.Namespace) -> tuple[dict | None, str]:
    python = SIDE_ENV / "bin" / "python"
    if not python.exists():
        return None, f"side environment {SIDE_ENV} absent (torch + torchaudio of matching versions; see README)"
    cmd = [str(python), "-m", "hpc_asr", "bench", "train", "--torchaudio-worker", "--threads", str(a.ta_threads),
           *_sizes(a)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=a.timeout)
    if proc.returncode != 0:
        return None, f"side environment run failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), "measured"


def seed_prediction(out_dir: Path) -> dict:
    """The seed preset (16 x 512) on 8..128 A100: FLOPs counted, hardware assumed."""
    from hpc_asr.bench import scaling
    from hpc_asr.cli import load_config
    from hpc_asr.config import ModelConfig

    preset = ROOT / "hpc_asr" / "configs" / "seed.yaml"
    if preset.is_file():
        cfg = load_config(preset)
        model, max_frames = cfg.model, cfg.data.max_frames
        vocab = model.vocab_size or (cfg.train.bpe_vocab_size if cfg.train.tokenizer == "bpe" else 29)
        model = ModelConfig(**{**vars(model), "vocab_size": vocab})
        source = str(preset.relative_to(ROOT))
    else:
        model = ModelConfig(d_model=512, n_heads=8, n_layers=16, ff_mult=4, conv_kernel=31, vocab_size=29)
        max_frames, source = 12000, "ModelConfig(d_model=512, n_heads=8, n_layers=16, ff_mult=4, conv_kernel=31)"
    utt_frames = 1500  # 15 s utterances, LibriSpeech's typical length
    utts = max(1, max_frames // utt_frames)
    flops, params = scaling.step_flops(model, utt_frames, utts)
    pred = scaling.predict(flops, params, [8, 16, 32, 64, 128], scaling.Cluster())
    scaling.plot(pred, out_dir / "scaling.png")
    pred.update(model=source, params=params, per_gpu_batch=f"{utts} x {utt_frames / 100:g} s",
                flops_per_step=flops, flops_per_audio_second=flops / (utts * utt_frames / 100),
                measured_gpu_step_s=None, measured_gpu_step_note="no GPU on this machine",
                inputs={"measured": ["model FLOPs and parameter count (torch.utils.flop_counter, meta device)"],
                        "assumed": ["A100 peak 312 TFLOPS and utilisation 0.35", "NVLink bus 230 GB/s, α 3 µs",
                                    "one HDR port per node: 25 GB/s, α 8 µs", "8 GPUs per node",
                                    "per-GPU batch of data.max_frames in 15 s utterances",
                                    "no overlap of allreduce with backward"]})
    return pred


def orchestrate(a: argparse.Namespace) -> int:
    import tempfile

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        scaling_res = weak_scaling(a, Path(tmp))
    ta, ta_note = (None, "skipped (--no-torchaudio)") if a.no_torchaudio else torchaudio_comparison(a)
    pred = seed_prediction(out.parent)
    res = {
        "weak_scaling_efficiency_horovod": scaling_res["horovod"]["efficiency"],
        "weak_scaling_efficiency_torch": scaling_res["torch"]["efficiency"],
        "fp16_allreduce_bytes_ratio": scaling_res["fp16_bytes"]["ratio"],
        "speedup_vs_torchaudio_conformer": ta["ratio_geomean"] if ta else None,
        "speedup_vs_torchaudio_conformer_rel_attention": ta["ratio_rel_geomean"] if ta else None,
        "speedup_vs_torchaudio_note": ta_note,
        "predicted_speedup": {k: v["speedup"] for k, v in pred["fp16"].items()},
        "details": {"weak_scaling": scaling_res, "torchaudio": ta, "prediction": pred,
                    "bench_model": {"d_model": a.d_model, "layers": a.layers, "batch": a.batch,
                                    "utt_seconds": a.utt_seconds, "steps": a.steps, "warmup": a.warmup,
                                    "repeats": a.repeats, "threads_per_rank": 1},
                    "cpus": len(os.sched_getaffinity(0)), "wall_s": round(time.time() - t0, 1)},
    }
    write_json_atomic(out, res)
    _print_summary(res, pred, out)
    return 0


def _print_summary(res: dict, pred: dict, out: Path) -> None:
    p = print
    p(f"bench-train → {out}")
    p(f"  weak scaling 1→2 ranks: horovod {res['weak_scaling_efficiency_horovod']}, "
      f"torch {res['weak_scaling_efficiency_torch']}   fp16/fp32 allreduce bytes {res['fp16_allreduce_bytes_ratio']}")
    p(f"  vs torchaudio Conformer (geomean of fp32/bf16 x 3/10 s): abs {res['speedup_vs_torchaudio_conformer']}, "
      f"rel {res['speedup_vs_torchaudio_conformer_rel_attention']} ({res['speedup_vs_torchaudio_note']})")
    p(f"  seed preset, predicted speed-up over 8 A100 ({pred['per_gpu_batch']} per GPU):")
    p("    GPUs   fp32-wire  fp16-wire  article")
    for n in pred["gpus"]:
        art = pred["article_speedup"].get(str(n), "")
        p(f"    {n:4d}   {pred['fp32'][str(n)]['speedup']:9.2f}  {pred['fp16'][str(n)]['speedup']:9.2f}  {art}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench/train.json")
    ap.add_argument("--d-model", type=int, default=144)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--utt-seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating 1-/2-rank runs per engine (medians)")
    ap.add_argument("--ta-threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--no-torchaudio", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--torchaudio-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="horovod", help=argparse.SUPPRESS)
    ap.add_argument("--compression", default="fp16", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--timeline", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.torchaudio_worker:
        return torchaudio_worker(a)
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
