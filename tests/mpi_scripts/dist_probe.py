"""Run under a launcher (mpirun -np 2, torchrun --nproc_per_node 2, or plain python): probes of
``hpc_asr.dist.launch`` that the test inspects afterwards.

    <launcher> python tests/mpi_scripts/dist_probe.py ENGINE OUT_DIR [TIMELINE]

``make_engine`` runs before torch is imported, so a launcher/engine mismatch fails in a blink.
Writes ``OUT_DIR/probe.<rank>.json`` (engine, world, collectives, threads) and
``OUT_DIR/state.<rank>.pt`` (model + optimizer state after ``broadcast_state``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from hpc_asr.config import DistConfig
from hpc_asr.dist.engines import make_engine
from hpc_asr.dist.launch import compute_threads


def collectives(engine) -> dict:
    import torch

    r = engine.world.rank
    big = torch.tensor([1e300 * (r + 1), 1.0 / 3.0 + r], dtype=torch.float64)  # not representable in fp32
    flags = torch.tensor([True, r == 0])
    ints = torch.tensor([7 * (r + 1)], dtype=torch.int32)
    out = {"f64": engine.allreduce_sum(big), "bool": engine.allreduce_sum(flags), "i32": engine.allreduce_sum(ints)}
    return {k: {"values": v.tolist(), "dtype": str(v.dtype), "device": str(v.device)} for k, v in out.items()}


def fp16_overflow_step(engine, predivide: float = 0.0) -> dict | None:
    """One SGD(lr=1) step through the engine's optimizer with a gradient of 40000 on every rank: the
    average is 40000, but an fp16 *sum* of two of them (80000) is inf."""
    import torch
    from torch import nn

    if engine.name != "horovod":
        return None
    engine.compression = "fp16"
    engine.knobs = dataclasses.replace(engine.knobs, gradient_predivide_factor=predivide)
    w = nn.Parameter(torch.zeros(4))
    holder = nn.Module()
    holder.register_parameter(f"w_overflow_{predivide:g}", w)
    opt = engine.wrap_optimizer(torch.optim.SGD([w], lr=1.0), holder, accum_steps=1)
    (w * 40000.0).sum().backward()
    opt.step()
    return {"w1": w.detach().tolist(), "predivide": engine.predivide_factor()}


def broadcast(engine, out: Path) -> None:
    import torch

    torch.manual_seed(10 + engine.world.rank)  # different weights and optimizer state per rank ...
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2 * (engine.world.rank + 1))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    for _ in range(engine.world.rank + 1):
        opt.step()
    engine.broadcast_state(model, opt)  # ... until rank 0's are broadcast
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / f"state.{engine.world.rank}.pt")


def main() -> int:
    name, out = sys.argv[1], Path(sys.argv[2])
    cfg = DistConfig(engine=name, compression="none", timeline=sys.argv[3] if len(sys.argv) > 3 else "")
    engine = make_engine(cfg)
    import torch

    torch.set_num_threads(1)
    probe = {"engine": engine.name, "world": list(vars(engine.world).values()),
             "threads": compute_threads(0, engine), "rendezvous": getattr(engine, "rendezvous", None),
             "backend": getattr(engine, "backend", None), "collectives": collectives(engine),
             "gathered": engine.gather_object(engine.world.rank * 10), "fp16": fp16_overflow_step(engine),
             "fp16_sum_first": fp16_overflow_step(engine, predivide=1.0),
             "env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_") and "RANK" not in k}}
    broadcast(engine, out)
    (out / f"probe.{engine.world.rank}.json").write_text(json.dumps(probe))
    engine.barrier()
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
