"""GPU probe of hpc_asr.dist.launch, run under mpirun/torchrun on a CUDA machine:

    <launcher> python tests/mpi_scripts/dist_gpu_probe.py ENGINE OUT_DIR

Writes ``OUT_DIR/gpu.<rank>.json``: collectives on CUDA and CPU tensors of several dtypes, and the
devices the broadcast optimizer state landed on (each rank's own GPU, not cuda:0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hpc_asr.config import DistConfig
from hpc_asr.dist.engines import make_engine


def main() -> int:
    name, out = sys.argv[1], Path(sys.argv[2])
    engine = make_engine(DistConfig(engine=name, compression="fp16"))
    import torch

    r, dev = engine.world.rank, engine.device
    probes = {"cuda_f32": torch.full((3,), r + 1.0, device=dev),
              "cpu_f64": torch.tensor([1e300 * (r + 1)], dtype=torch.float64),
              "cuda_f64": torch.tensor([1 / 3 + r], dtype=torch.float64, device=dev),
              "cuda_bool": torch.tensor([True], device=dev), "cpu_i64": torch.tensor([r + 5])}
    reduced = {k: engine.allreduce_sum(v) for k, v in probes.items()}
    res = {"engine": engine.name, "world": [r, engine.world.size], "device": str(dev),
           "backend": getattr(engine, "backend", None),
           "reduced": {k: {"values": v.tolist(), "device": v.device.type} for k, v in reduced.items()}}
    torch.manual_seed(r)
    model = torch.nn.Linear(8, 8).to(dev)
    opt = engine.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, accum_steps=1)
    model = engine.wrap_model(model)
    model(torch.randn(4, 8, device=dev)).sum().backward()
    engine.synchronize(opt)
    with engine.skip_synchronize(opt):
        opt.step()
    engine.broadcast_state(model.module if hasattr(model, "module") else model, opt)
    state = opt.state_dict()["state"]
    res["opt_devices"] = sorted({str(t.device) for s in state.values() for k, t in s.items() if k != "step"})
    res["weight_sum"] = float(next(iter(opt.param_groups[0]["params"])).detach().sum())
    (out / f"gpu.{r}.json").write_text(json.dumps(res))
    engine.barrier()
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
