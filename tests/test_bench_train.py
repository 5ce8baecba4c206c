"""bench_train with tiny sizes (real mpirun runs, real Horovod timelines) and the scaling model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_asr.bench import scaling
from hpc_asr.bench.train import main, timeline_allreduce_bytes
from hpc_asr.config import ModelConfig


def test_ring_allreduce_alpha_beta():
    c = scaling.Cluster(gpus_per_node=8, nvlink_GBps=100, nvlink_alpha_s=1e-6, ib_GBps=10, ib_alpha_s=1e-5)
    assert scaling.ring_allreduce_s(1e9, 1, c) == 0.0
    assert scaling.ring_allreduce_s(1e9, 8, c) == pytest.approx(14e-6 + 2 * 7 / 8 * 1e9 / 100e9)
    assert scaling.ring_allreduce_s(1e9, 16, c) == pytest.approx(30e-5 + 2 * 15 / 16 * 1e9 / 10e9)  # IB-bound


def test_step_flops_counts_the_model():
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=1, ff_mult=2, conv_kernel=5, subsampling="conv1d",
                      vocab_size=29)
    f1, params = scaling.step_flops(cfg, 400, 1)
    f2, _ = scaling.step_flops(cfg, 800, 1)
    assert params > 0 and 6 * params * 50 < f1  # >= 6 FLOPs per parameter per output frame (fwd+bwd)
    assert 2.0 < f2 / f1 < 2.6  # ~linear in length at this size (attention adds a little)


def test_prediction_with_and_without_fp16():
    pred = scaling.predict(1e12, 10**8, [8, 16, 32], scaling.Cluster())
    assert pred["fp32"]["8"]["speedup"] == pred["fp16"]["8"]["speedup"] == 1.0
    for n in ("16", "32"):
        assert pred["fp32"][n]["speedup"] < pred["fp16"][n]["speedup"] < int(n) / 8
        assert pred["fp16"][n]["allreduce_s"] == pytest.approx(pred["fp32"][n]["allreduce_s"] / 2, rel=0.05)


def test_timeline_bytes_parser(tmp_path):
    events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "allreduce.w"}},
              {"name": "process_name", "ph": "M", "pid": 2, "args": {"name": "broadcast.w"}},
              {"name": "process_name", "ph": "M", "pid": 3, "args": {"name": "allreduce.noname.7"}},
              {"ph": "E", "pid": 3, "args": {"dtype": "float64", "shape": "[1]"}},
              {"ph": "E", "pid": 1, "args": {"dtype": "float16", "shape": "[3, 4]"}},
              {"ph": "E", "pid": 2, "args": {"dtype": "float32", "shape": "[100]"}}]
    (tmp_path / "t.json").write_text(json.dumps(events))
    assert timeline_allreduce_bytes(tmp_path / "t.json") == {"float16": 24}


def test_bench_train_tiny_writes_json_and_plot(tmp_path):
    out = tmp_path / "bench" / "train.json"
    assert main(["--out", str(out), "--d-model", "32", "--layers", "1", "--batch", "2", "--utt-seconds", "1",
                 "--steps", "2", "--warmup", "1", "--repeats", "1", "--no-torchaudio"]) == 0
    res = json.loads(out.read_text())
    for key in ("weak_scaling_efficiency_horovod", "weak_scaling_efficiency_torch"):
        assert 0.05 < res[key] < 1.25  # 2 ranks cannot step faster than 1 (beyond noise): 1.5+ is a broken timer
    # Measured from Horovod's own timeline: every gradient went out as float16 with compression.
    fp16 = res["details"]["weak_scaling"]["fp16_bytes"]
    assert set(fp16["compressed"]) == {"float16"} and set(fp16["uncompressed"]) == {"float32"}
    assert res["fp16_allreduce_bytes_ratio"] == pytest.approx(0.5, abs=0.01)
    assert res["speedup_vs_torchaudio_conformer"] is None and "skipped" in res["speedup_vs_torchaudio_note"]
    assert list(res["predicted_speedup"]) == ["8", "16", "32", "64", "128"]
    assert res["predicted_speedup"]["8"] == 1.0
    pred = res["details"]["prediction"]
    assert pred["params"] > 50e6 and pred["inputs"]["assumed"] and pred["inputs"]["measured"]
    assert (out.parent / "scaling.png").stat().st_size > 10_000


def test_weak_scaling_times_without_timeline_and_takes_medians(tmp_path, monkeypatch):
    """Both engines are compared with the same baseline, one plain process (engine none: Horovod
    at size 1 registers no hooks, DDP at size 1 still buckets and compresses); the timed runs
    carry no Horovod timeline; the runs alternate and medians are compared. run_ranks is replaced
    by a recorder: the real mpirun path is what test_bench_train_tiny_writes_json_and_plot runs."""
    import argparse

    import hpc_asr.bench.train as bt

    calls = []
    step = {("none", 1): iter([0.30, 0.10, 0.20]), ("horovod", 2): iter([0.40, 0.25, 0.20]),
            ("torch", 2): iter([0.5, 0.4, 0.2])}

    def fake_run_ranks(a, tmp, engine, np, compression="fp16", timeline=None):
        calls.append((engine, np, compression, timeline))
        if timeline is not None:
            events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "allreduce.w"}},
                      {"ph": "E", "pid": 1, "args": {"dtype": "float16" if compression == "fp16" else "float32",
                                                     "shape": "[4]"}}]
            Path(timeline).write_text(json.dumps(events))
            return {"step_s": 99.0}
        return {"step_s": next(step[engine, np])}

    monkeypatch.setattr(bt, "run_ranks", fake_run_ranks)
    res = bt.weak_scaling(argparse.Namespace(repeats=3), tmp_path)
    timed = [c[:2] for c in calls if c[3] is None]
    assert timed == [("none", 1), ("horovod", 2), ("torch", 2)] * 3
    assert {c[:3] for c in calls if c[3] is not None} == {("horovod", 2, "fp16"), ("horovod", 2, "none")}
    assert res["horovod"]["step_s_1_rank"] == res["torch"]["step_s_1_rank"] == 0.2
    assert res["horovod"]["efficiency"] == 0.8 and res["torch"]["efficiency"] == 0.5
    assert res["fp16_bytes"]["ratio"] == 0.5
