"""Greedy-CTC WER/CER of a checkpoint on a prepared split.

    python -m hpc_asr.evaluate --checkpoint runs/demo/last.pt --data data/va/fbank/test \
        --out runs/demo/eval.json

Runs on one process or under mpirun (each rank scores every size-th utterance; counts are
summed). The JSON holds the rates and every hypothesis, so regressions can be diffed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from hpc_asr import checkpoint
from hpc_asr.config import Config
from hpc_asr.data import BucketBatchSampler, FeatureSet, collate
from hpc_asr.decode import greedy_batch
from hpc_asr.dist import Engine, make_engine
from hpc_asr.metrics import error_counts, rates
from hpc_asr.model import ConformerCTC
from hpc_asr.tokenizer import CharTokenizer, normalize

__all__ = ["evaluate", "load_model_and_data"]


@torch.no_grad()
def evaluate(model: ConformerCTC, data: FeatureSet, tok: CharTokenizer, engine: Engine, cfg: Config,
             keep_hyps: bool = False) -> dict:
    """Loss, WER and CER; with ``keep_hyps`` also {id: hypothesis} (gathered on rank 0)."""
    was_training = model.training
    model.eval()
    world = engine.world
    mine = list(range(world.rank, len(data), world.size))
    sampler = BucketBatchSampler(data.num_frames[mine], cfg.data.max_frames, cfg.data.max_utts, shuffle=False)
    ctc = nn.CTCLoss(blank=tok.blank, reduction="sum", zero_infinity=True)
    loss_sum, refs, hyps, ids = 0.0, [], [], []
    autocast_dtype = torch.float16 if engine.device.type == "cuda" else torch.bfloat16
    for local in sampler:
        batch = collate([data[mine[i]] for i in local], data.texts, tok).to(engine.device)
        with torch.autocast(engine.device.type, dtype=autocast_dtype, enabled=cfg.train.amp):
            lp, lens = model(batch.feats, batch.feat_lens)
        lp = lp.float()
        loss_sum += float(ctc(lp.transpose(0, 1), batch.targets, lens, batch.target_lens))
        hyps += greedy_batch(lp, lens, tok)
        refs += [normalize(data.texts[i]) for i in batch.indices]
        ids += [data.ids[i] for i in batch.indices]
    c = error_counts(refs, hyps)
    vec = torch.tensor([loss_sum, len(refs), c["word_errors"], c["words"], c["char_errors"], c["chars"]],
                       dtype=torch.float64)
    vec = engine.allreduce_sum(vec)  # dist: metrics reduced before logging
    total = dict(zip(["loss", "n", "word_errors", "words", "char_errors", "chars"], vec.tolist()))
    wer, cer = rates(total)
    if was_training:
        model.train()
    out = {"loss": total["loss"] / max(total["n"], 1), "wer": wer, "cer": cer, "utterances": int(total["n"]),
           **{k: int(total[k]) for k in ("word_errors", "words", "char_errors", "chars")}}
    if keep_hyps:
        pairs = engine.gather_object(list(zip(ids, refs, hyps)))  # dist
        if pairs is not None:
            out["hypotheses"] = {i: {"ref": r, "hyp": h} for part in pairs for i, r, h in part}
    return out


def load_model_and_data(ckpt: str, data_dir: str) -> tuple[ConformerCTC, CharTokenizer, Config, FeatureSet]:
    """A checkpoint and a prepared split it can score: their feature settings must agree, since
    a model fed features it was not trained on fails silently (plausible but wrong output)."""
    model, tok, cfg = checkpoint.load_model(ckpt)
    data = FeatureSet(data_dir)
    if data.features != cfg.features:
        raise ValueError(f"{data_dir}: features {data.features} differ from the model's {cfg.features}")
    return model, tok, cfg, data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="prepared feature directory (index.json + shards)")
    p.add_argument("--out", help="write results JSON here (rank 0)")
    p.add_argument("--engine", default="none", choices=["none", "horovod", "torch"])
    args = p.parse_args(argv)
    try:
        model, tok, cfg, data = load_model_and_data(args.checkpoint, args.data)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = make_engine(args.engine)
    model.to(engine.device)
    t0 = time.time()
    res = evaluate(model, data, tok, engine, cfg, keep_hyps=True)
    res["wall_s"] = round(time.time() - t0, 2)
    res["data"] = args.data
    if engine.world.is_main:
        print(f"[evaluate] {args.data}: {res['utterances']} utts  WER {res['wer']:.2%}  CER {res['cer']:.2%}",
              file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
