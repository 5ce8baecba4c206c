"""WER/CER of a checkpoint on a prepared split, with greedy, beam or beam+LM CTC decoding.

    python -m hpc_asr evaluate --checkpoint runs/demo/last.pt --data data/va/fbank/test \
        --decoder beam+lm --out runs/demo/eval.json [--lm runs/demo/lm] [--data.max_frames N]

Runs on one process or under any launcher (``mpirun -np 2 ...``): the engine is ``auto`` (what
the launcher implies; ``--dist.engine`` overrides); each rank scores every size-th utterance and the
error counts are summed. Any length is scored: batches are capped by ``data.max_frames`` padded
frames and an utterance longer than the cap is a batch of its own. The JSON holds the rates, the
substitutions/deletions/insertions, the most frequent errors and every hypothesis.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from hpc_asr import checkpoint
from hpc_asr.atomic import write_json_atomic
from hpc_asr.cli import override_pairs
from hpc_asr.config import Config, ConfigError
from hpc_asr.data.loader import FeatureSet, make_eval_loader, usable_subset
from hpc_asr.data.text import normalize
from hpc_asr.decode.ctc import DECODERS, file_sha256, greedy_batch, lm_files, make_decoder
from hpc_asr.decode.wer import COUNT_KEYS, error_counts, frequent_errors, rates
from hpc_asr.dist.engines import Engine, make_engine
from hpc_asr.model import ConformerCTC

__all__ = ["eval_batches", "evaluate", "load_model_and_data", "posteriors"]

OVERRIDABLE = ("data", "dist", "decode")  # sections that may change at evaluation; the rest is the model's


def eval_batches(num_frames, max_frames: int, max_utts: int) -> list[list[int]]:
    """Indices in length order, packed while (longest x count) stays within ``max_frames`` padded
    frames and ``max_utts``; an utterance longer than ``max_frames`` goes alone, never refused."""
    frames = np.asarray(num_frames)
    batches, batch, longest = [], [], 0
    for i in np.argsort(frames, kind="stable"):
        n = int(frames[i])
        if batch and (max(longest, n) * (len(batch) + 1) > max_frames or len(batch) >= max_utts):
            batches.append(batch)
            batch, longest = [], 0
        batch.append(int(i))
        longest = max(longest, n)
    return [*batches, batch] if batch else batches


def posteriors(model: ConformerCTC, data, tok, cfg: Config,
               mine: list[int]) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, float]]:
    """(dataset indices, (B, T, V) log-probs on CPU, (B,) lengths, summed CTC loss) per batch of
    the utterances ``mine``, computed where the model is. Utterances too short for the subsampling
    get zero output frames."""
    ctc = nn.CTCLoss(blank=tok.blank, reduction="sum", zero_infinity=True)
    device = next(model.parameters()).device  # batches follow the model, wherever the caller put it
    dtype = cfg.train.autocast_dtype(device.type)  # the precision it was trained in
    usable, _ = usable_subset(data.num_frames[mine], cfg.model)
    ok = [mine[j] for j in usable]
    short = sorted(set(mine) - set(ok))
    if short:
        yield short, torch.zeros(len(short), 0, tok.vocab_size), torch.zeros(len(short), dtype=torch.long), 0.0
    batches = [[ok[i] for i in local] for local in eval_batches(data.num_frames[ok], cfg.data.max_frames,
                                                                 cfg.data.max_utts)]
    for batch in make_eval_loader(data, batches, tok, num_workers=cfg.data.num_workers):  # same loader as training
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            lp, lens = model(batch.feats, batch.feat_lens)
        lp = lp.float()
        loss = float(ctc(lp.transpose(0, 1), batch.targets, lens, batch.target_lens))
        yield batch.indices, lp.cpu(), lens.cpu(), loss


def _reduce(engine: Engine, loss: float, n: int, counts: dict[str, int]) -> dict[str, float]:
    keys = ["loss", "n", *COUNT_KEYS]
    vec = torch.tensor([loss, n, *(counts[k] for k in COUNT_KEYS)], dtype=torch.float64)
    if engine.device.type == "cuda":  # NCCL reduces device tensors only
        vec = vec.to(engine.device)
    vec = engine.allreduce_sum(vec).cpu()  # dist: metrics reduced before logging
    return dict(zip(keys, vec.tolist()))


@torch.no_grad()
def evaluate(model: ConformerCTC, data, tok, engine: Engine, cfg: Config, keep_hyps: bool = False,
             decode: Callable | None = None) -> dict:
    """Loss, WER and CER (greedy unless ``decode(log_probs, lengths) -> [str]`` is given); with
    ``keep_hyps`` also every {id: ref, hyp} and the most frequent errors (gathered on rank 0)."""
    was_training = model.training
    model.eval()
    world = engine.world
    decode = decode or (lambda lp, ln: greedy_batch(lp, ln, tok))
    mine = list(range(world.rank, len(data), world.size))
    loss_sum, refs, hyps, ids = 0.0, [], [], []
    for indices, lp, lens, loss in posteriors(model, data, tok, cfg, mine):
        loss_sum += loss
        hyps += decode(lp, lens) if lp.shape[1] else [""] * len(indices)
        refs += [normalize(data.texts[i]) for i in indices]
        ids += [data.ids[i] for i in indices]
    total = _reduce(engine, loss_sum, len(refs), error_counts(refs, hyps))
    wer, cer = rates(total)
    if was_training:
        model.train()
    out = {"loss": total["loss"] / max(total["n"], 1), "wer": wer, "cer": cer, "utterances": int(total["n"]),
           **{k: int(total[k]) for k in COUNT_KEYS}}
    if keep_hyps:
        pairs = engine.gather_object(list(zip(ids, refs, hyps)))  # dist
        if pairs is not None:
            every = [p for part in pairs for p in part]
            out["frequent_errors"] = frequent_errors([r for _, r, _ in every], [h for _, _, h in every])
            out["hypotheses"] = {i: {"ref": r, "hyp": h} for i, r, h in every}
    return out


def load_model_and_data(ckpt: str, data_dir: str):
    """A checkpoint and a prepared split it can score: their feature settings must agree, since
    a model fed features it was not trained on fails silently (plausible but wrong output)."""
    model, tok, cfg = checkpoint.load_model(ckpt)
    data = FeatureSet(data_dir)
    if data.features != cfg.features:
        raise ValueError(f"{data_dir}: features differ from the model's ({data.features.differences(cfg.features)}; "
                         f"the data's value first)")
    return model, tok, cfg, data


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``--section.key value`` pairs onto the checkpoint's config; only data, dist and decode
    sections may change (the rest describes the trained model). The engine is this launch's, not
    the training run's: ``dist`` starts from the defaults (engine auto), so a model trained with
    the elastic engine or under another launcher is scored under whatever launched evaluation."""
    raw = cfg.to_dict()
    raw["dist"] = {}
    for key, value in override_pairs(overrides):
        section, _, name = key.partition(".")
        if section not in OVERRIDABLE or not name:
            raise ConfigError(f"command line: --{key}: only {', '.join(s + '.*' for s in OVERRIDABLE)} can be set "
                              f"at evaluation")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    return Config.from_dict(raw, "command line")


def _parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="prepared feature directory (index.json + shards)")
    p.add_argument("--out", help="write results JSON here (rank 0)")
    p.add_argument("--decoder", choices=DECODERS, default=None, help="default: decode.decoder of the config")
    p.add_argument("--lm", help="ARPA file or directory with lm.arpa (default: <checkpoint dir>/lm)")
    p.add_argument("--engine", choices=["auto", "none", "horovod", "torch"], default="auto",
                   help="distributed engine (--dist.engine wins); auto: what the launcher implies")
    return p.parse_known_args(argv)


def build_decoder(kind: str, tok, cfg: Config, lm_arg: str | None, ckpt: str):
    """The decode callable and a description of it (LM path and weights) for the JSON."""
    dc = cfg.decode
    beam = dc.beam_size
    if kind != "beam+lm":
        return make_decoder(kind, tok, beam_size=beam, token_beam=dc.token_beam), {"decoder": kind}
    lm = lm_files(lm_arg or dc.lm or Path(ckpt).resolve().parent / "lm", model_sha256=file_sha256(ckpt))
    kw = {"hotwords": tuple(w.strip() for w in dc.hotwords.split(",") if w.strip()),
          "hotword_score": dc.hotword_score}
    info = {"decoder": kind, "lm": str(lm.arpa), "lm_weight": lm.lm_weight, "word_score": lm.word_score,
            "tuned_on_dev": lm.tuned, "tuned_on_this_checkpoint": lm.tuned_on_this_model, "beam_size": beam,
            "token_beam": dc.token_beam}
    return make_decoder(kind, tok, beam_size=beam, lm=lm, token_beam=dc.token_beam, **kw), info


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(argv)
    try:
        model, tok, cfg, data = load_model_and_data(args.checkpoint, args.data)
        cfg = apply_overrides(cfg, ["--dist.engine", args.engine, *rest])  # the training engine is not the model's
        kind = args.decoder or cfg.decode.decoder
        decode, info = build_decoder(kind, tok, cfg, args.lm, args.checkpoint)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = make_engine(cfg.dist)
    model.to(engine.device)
    t0 = time.time()
    res = evaluate(model, data, tok, engine, cfg, keep_hyps=True, decode=decode)
    res.update(info, wall_s=round(time.time() - t0, 2), data=args.data)
    if engine.world.is_main:
        print(f"[evaluate] {args.data}: {res['utterances']} utts  {kind}  WER {res['wer']:.2%}  "
              f"CER {res['cer']:.2%}", file=sys.stderr)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, res)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
