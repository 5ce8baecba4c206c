"""Horovod elastic training under ``horovodrun --min-np 1 --max-np 2 --host-discovery-script``:

    horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script DISCOVER python dist_elastic.py DIR

``DIR/hosts`` is what DISCOVER prints. Rank 0 shrinks it to ``localhost:1`` after step 4 and grows
it back to ``localhost:2`` after step 12; the state (``hvd.elastic.TorchState``: model, optimizer,
step) survives both resets. Rank r feeds inputs of r + 1, so the averaged gradient depends on the
world size and an unsynchronised rank shows. Every committed step appends ``step size weight`` to
``DIR/log`` (rank 0) and to ``DIR/log.<rank>`` (every rank, its own weights).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from hpc_asr.dist.engines import make_engine

STEPS, SHRINK_AT, GROW_AT = 24, 4, 12


def main() -> int:
    out = Path(sys.argv[1])
    engine = make_engine("horovod")  # horovodrun sets HOROVOD_RANK: auto would pick it too
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    opt = engine.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, accum_steps=1)
    state = engine.elastic_state(model, opt, step=0)

    @engine.elastic_run
    def train(state) -> None:
        while state.step < STEPS:
            opt.zero_grad()
            model(torch.full((2, 4), engine.world.rank + 1.0)).sum().backward()  # dist: averaged over the ranks
            opt.step()
            state.step += 1
            line = f"{state.step} {engine.world.size} {model.weight.detach().sum().item():.6f}\n"
            with open(out / f"log.{engine.world.rank}", "a") as f:
                f.write(line)
            if engine.world.rank == 0:
                with open(out / "log", "a") as f:
                    f.write(line)
                if state.step == SHRINK_AT:
                    (out / "hosts").write_text("localhost:1\n")
                elif state.step == GROW_AT:
                    (out / "hosts").write_text("localhost:2\n")
            time.sleep(0.5)  # let the driver's discovery (1 s period) notice the change mid-run
            state.commit()  # dist: checkpoint in memory; host changes interrupt here

    train(state)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
