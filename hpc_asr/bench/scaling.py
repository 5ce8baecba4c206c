"""Predicted data-parallel scaling: model FLOPs at a stated GPU utilisation plus an α-β
ring-allreduce model (NVLink inside a node, InfiniBand between nodes).

Weak scaling, as the article trains: every GPU keeps its batch, so the step time at N GPUs is
``compute + allreduce(N)`` (no overlap of the allreduce with the backward pass: conservative) and
the speed-up over ``base`` GPUs is ``(N / base) * step(base) / step(N)``.

Ring allreduce of M bytes over N ranks: ``2 (N-1) α + 2 (N-1)/N · M / B`` with B the slowest link in
the ring: NVLink while the ring stays in one node, the node's InfiniBand bandwidth once it spans
nodes (NCCL runs one ring per NIC rail, so B is the node's total HDR bandwidth).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hpc_asr.atomic import atomic_path

__all__ = ["Cluster", "predict", "ring_allreduce_s", "step_flops"]

ARTICLE = {8: 1.0, 16: 1.85, 32: 3.33}  # the source article's measured speed-ups (8 → 32 A100)


@dataclass(frozen=True)
class Cluster:
    """Assumed hardware; every number is a published peak or a typical measured bus bandwidth."""

    gpus_per_node: int = 8
    peak_tflops: float = 312.0  # A100 dense bf16/fp16 tensor-core peak
    utilisation: float = 0.35  # model FLOPs utilisation assumed for a Conformer step (no measurement here)
    nvlink_GBps: float = 230.0  # NCCL allreduce bus bandwidth inside an HGX A100 (NVLink 3 + NVSwitch)
    nvlink_alpha_s: float = 3e-6  # per ring step inside a node
    ib_GBps: float = 25.0  # one HDR InfiniBand port per node: 200 Gb/s
    ib_alpha_s: float = 8e-6  # per ring step across nodes (HDR latency + NCCL protocol)


def ring_allreduce_s(nbytes: float, n: int, c: Cluster) -> float:
    """Seconds for a ring allreduce of ``nbytes`` over ``n`` GPUs (0 for one GPU)."""
    if n <= 1:
        return 0.0
    one_node = n <= c.gpus_per_node
    bw, alpha = (c.nvlink_GBps, c.nvlink_alpha_s) if one_node else (c.ib_GBps, c.ib_alpha_s)
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / (bw * 1e9)


def step_flops(model_cfg, frames: int, utts: int = 1, num_bins: int = 80) -> tuple[float, int]:
    """(forward + backward FLOPs, parameter count) of one batch of ``utts`` utterances of ``frames``
    input frames, counted by torch.utils.flop_counter on a meta-device model (no memory, no time)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hpc_asr.model import ConformerCTC

    with torch.device("meta"):
        model = ConformerCTC(model_cfg, num_bins)
        feats = torch.zeros(utts, frames, num_bins)
        lengths = torch.full((utts,), frames)
    with FlopCounterMode(display=False) as counter:
        log_probs, _ = model(feats, lengths)
        log_probs.sum().backward()
    return float(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


def predict(flops_per_step: float, params: int, gpus: list[int], cluster: Cluster, base: int = 8,
            measured_step_s: float | None = None) -> dict:
    """Step time and speed-up over ``base`` GPUs, fp32 and fp16 gradients on the wire."""
    compute = measured_step_s or flops_per_step / (cluster.peak_tflops * 1e12 * cluster.utilisation)
    out: dict = {"compute_s": compute, "compute_source": "measured" if measured_step_s else "flops/utilisation",
                 "cluster": asdict(cluster), "gpus": gpus}
    for name, bytes_per_param in (("fp32", 4), ("fp16", 2)):
        steps = {n: compute + ring_allreduce_s(params * bytes_per_param, n, cluster) for n in [*gpus, base]}
        out[name] = {str(n): {"step_s": round(steps[n], 5), "allreduce_s": round(steps[n] - compute, 5),
                              "speedup": round(n / base * steps[base] / steps[n], 3)} for n in gpus}
    out["article_speedup"] = {str(n): s for n, s in ARTICLE.items()}
    return out


def plot(pred: dict, path) -> None:
    """Speed-up vs GPUs: linear, the article, and the model with fp32 / fp16 gradients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = pred["gpus"]
    base = min(gpus)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(gpus, [n / base for n in gpus], "k:", label="linear")
    for name in ("fp32", "fp16"):
        ax.plot(gpus, [pred[name][str(n)]["speedup"] for n in gpus], "o-", label=f"α-β model, {name} allreduce")
    ax.plot(list(ARTICLE), list(ARTICLE.values()), "s--", color="tab:red", label="article (measured)")
    ax.set(xscale="log", yscale="log", xlabel="A100 GPUs", ylabel=f"speed-up over {base} GPUs",
           title="Seed Conformer (16 x 512), weak scaling")
    ax.set_xticks(gpus, [str(n) for n in gpus])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def frames_for(seconds: float, frame_shift_ms: float = 10.0) -> int:
    return math.ceil(seconds * 1000 / frame_shift_ms)
