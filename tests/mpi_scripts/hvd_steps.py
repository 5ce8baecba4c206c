"""Run under ``mpirun -np 2``: probes of the Horovod engine that the test inspects afterwards.

    mpirun -np 2 python tests/mpi_scripts/hvd_steps.py FEATURE_DIR OUT_DIR

Writes, per rank r, ``OUT_DIR/allreduce.r.json`` (one SGD step through the engine's
DistributedOptimizer, with and without fp16 compression) and ``OUT_DIR/train.r.pt`` (the model
after a few real training steps on that rank's own batches). Assertions live in the test, so
a failure there shows both ranks' numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from hpc_asr.config import ModelConfig
from hpc_asr.data.loader import BucketBatchSampler, FeatureSet, collate
from hpc_asr.data.tokenizer import CharTokenizer
from hpc_asr.dist.engines import make_engine
from hpc_asr.model import ConformerCTC


def rank_grad(rank: int) -> torch.Tensor:
    # Thirds are not representable in fp16, so fp16 on the wire visibly changes the mean.
    return (rank + 1) / 3 + 0.01 * torch.arange(8, dtype=torch.float32)


def sgd_step(engine, compression: str) -> dict:
    """One SGD(lr=1) step whose gradient is ``rank_grad(rank)`` on every rank."""
    engine.compression = compression
    w = nn.Parameter(torch.linspace(-1.0, 1.0, 8))
    holder = nn.Module()
    holder.register_parameter(f"w_{compression}", w)
    w0 = w.detach().clone()
    opt = engine.wrap_optimizer(torch.optim.SGD([w], lr=1.0), holder, accum_steps=1)
    (w * rank_grad(engine.world.rank)).sum().backward()  # d/dw = rank_grad: goes through the hooks
    opt.step()
    return {"w0": w0.tolist(), "grad": rank_grad(engine.world.rank).tolist(), "w1": w.detach().tolist()}


def train_steps(engine, feature_dir: Path) -> dict:
    rank, size = engine.world.rank, engine.world.size
    data = FeatureSet(feature_dir)
    tok = CharTokenizer()
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=1, ff_mult=2, conv_kernel=5, subsample_channels=8,
                      dropout=0.0, vocab_size=tok.vocab_size)
    torch.manual_seed(100 + rank)  # different init per rank: only broadcast_state can make them agree
    model = ConformerCTC(cfg, data.features.num_mel_bins)
    model.set_cmvn(data.cmvn_mean, data.cmvn_std)
    init_own = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = engine.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, accum_steps=1)
    engine.broadcast_state(model, optimizer)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    sampler = BucketBatchSampler(data.num_frames, 2000, 2, rank, size, shuffle=True, seed=0)
    ctc = nn.CTCLoss(blank=tok.blank, reduction="sum", zero_infinity=True)
    seen, losses = [], []
    for idx in sampler:  # a few steps: 8 utterances, 2 per batch, 2 ranks
        batch = collate([data[i] for i in idx], data.texts, tok)
        lp, lens = model(batch.feats, batch.feat_lens)
        loss = ctc(lp.transpose(0, 1), batch.targets, lens, batch.target_lens) / len(idx)
        loss.backward()
        engine.synchronize(optimizer)  # same sequence as hpc_asr.train: reduce, clip, step
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        with engine.skip_synchronize(optimizer):
            optimizer.step()
        optimizer.zero_grad()
        seen.append(idx)
        losses.append(float(loss.detach()))
    return {"init_own": init_own, "init": init, "final": model.state_dict(), "batches": seen, "losses": losses}


def main() -> int:
    feature_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    engine = make_engine("horovod", "fp16")
    rank = engine.world.rank
    probe = {"size": engine.world.size, "fp16": sgd_step(engine, "fp16"), "none": sgd_step(engine, "none")}
    (out / f"allreduce.{rank}.json").write_text(json.dumps(probe))
    engine.compression = "fp16"
    torch.save(train_steps(engine, feature_dir), out / f"train.{rank}.pt")
    engine.barrier()
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
