"""Run under a 2-rank launcher: BatchNorm statistics of ranks that see different data.

    <launcher> python tests/mpi_scripts/bn_average.py ENGINE OUT_DIR

Each rank trains a BatchNorm-first model through the engine (wrapped model and optimizer, state
broadcast) for 3 steps on its own data (rank r: inputs of mean 10 r, std 1 + 2 r), beside a plain BatchNorm
fed the same batches (what this rank's statistics must be if nothing overwrote them). Then
``Engine.average_batchnorm_stats``. Writes ``OUT_DIR/bn.<rank>.pt``: {own, reference, averaged}.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpc_asr.dist.engines import make_engine

engine = make_engine(sys.argv[1])
out = Path(sys.argv[2])

import torch  # noqa: E402  (after the engine, as in training)
from torch import nn  # noqa: E402

rank = engine.world.rank
torch.manual_seed(0)
model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 1))
reference = nn.BatchNorm1d(4)
ddp = engine.wrap_model(model)
opt = engine.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, 1)
engine.broadcast_state(model, opt)
gen = torch.Generator().manual_seed(100 + rank)
for _ in range(3):
    x = 10.0 * rank + (1.0 + 2.0 * rank) * torch.randn(16, 4, generator=gen)
    reference(x)
    ddp(x).square().mean().backward()
    engine.synchronize(opt)
    with engine.skip_synchronize(opt):
        opt.step()
    opt.zero_grad()
bn = model[0]
own = {"mean": bn.running_mean.clone(), "var": bn.running_var.clone()}
engine.average_batchnorm_stats(model)
torch.save({"own": own, "reference": {"mean": reference.running_mean, "var": reference.running_var},
            "averaged": {"mean": bn.running_mean.clone(), "var": bn.running_var.clone()}}, out / f"bn.{rank}.pt")
engine.barrier()
engine.shutdown()
