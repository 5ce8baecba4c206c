"""Run under ``mpirun -np 2``: does the torch engine's DDP put fp16 on the wire?

    mpirun -np 2 python tests/mpi_scripts/ddp_fp16_probe.py OUT_DIR

Every rank's gradient is 1 + 2**-12, exact in float32 but not in float16 (10 mantissa bits: it
rounds to 1). Through the engine's DDP (dist.compression fp16) the averaged gradient is 1.0;
through a plain DDP on the same process group it stays 1 + 2**-12. Writes OUT_DIR/fp16.<rank>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hpc_asr.dist.engines import make_engine

engine = make_engine("torch", compression="fp16")

import torch  # noqa: E402  (after the engine, as in training)
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

x = torch.tensor([[1.0 + 2.0**-12]])
out = {}
for name in ("engine", "plain"):
    model = nn.Linear(1, 1, bias=False)
    ddp = engine.wrap_model(model) if name == "engine" else DistributedDataParallel(model)  # dist
    ddp(x).sum().backward()  # d(w x)/dw = x on every rank; DDP averages over the ranks
    out[name] = model.weight.grad.item()
Path(sys.argv[1], f"fp16.{engine.world.rank}.json").write_text(json.dumps(out))
engine.shutdown()
