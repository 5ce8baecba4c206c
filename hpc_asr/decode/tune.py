"""Tune the beam decoder's LM weight and word bonus on dev (grid search; posteriors computed once).

    [mpirun -np N] hpc-asr lm tune --checkpoint runs/demo/last.pt --data data/va/fbank/dev \
        --lm runs/demo/lm/lm.arpa      # writes runs/demo/lm/decode.json

Under mpirun each rank decodes every N-th grid point and rank 0 picks the best. A wide beam
costs time per grid point: tune at a narrower one (``--beam-size``/``--token-beam``) than you
decode with; the demo tunes at 512/8 and decodes at 4096/12 (the best weights stayed the same
from beam 512 to 4096 on the demo model, docs/accuracy.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpc_asr.data.text import normalize
from hpc_asr.decode.ctc import write_tuned

__all__ = ["main", "tune"]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def tune(ckpt: str, dev: str, arpa: Path, weights: list[float], bonuses: list[float], beam: int,
         token_beam: int = 0, rank: int = 0, size: int = 1) -> dict | None:
    """Grid search of (lm_weight, word_score) for the lowest dev WER; posteriors are computed
    once. Only dev is read: the test split never influences the weights. With ``size`` > 1 this
    rank scores every ``size``-th grid point; rank 0 gets the result, the others None."""
    import torch

    from hpc_asr.decode.ctc import BeamDecoder, LmFiles, greedy_batch
    from hpc_asr.decode.evaluate import load_model_and_data, posteriors
    from hpc_asr.decode.wer import error_counts, rates
    from hpc_asr.dist.engines import Engine
    from hpc_asr.dist.launch import World

    model, tok, cfg, data = load_model_and_data(ckpt, dev)
    model.to(Engine(World()).device)  # this process's GPU when there is one; the batches follow the model
    with torch.no_grad():
        outs = list(posteriors(model, data, tok, cfg, list(range(len(data)))))
    refs = [normalize(data.texts[i]) for idx, *_ in outs for i in idx]

    def wer(decode) -> float:
        hyps = [h for _, lp, ln, _ in outs for h in (decode(lp, ln) if lp.shape[1] else [""] * len(ln))]
        return round(rates(error_counts(refs, hyps))[0], 5)

    dec = BeamDecoder(tok, beam, lm=LmFiles(arpa), token_beam=token_beam)
    points = [(w, b) for w in weights for b in bonuses]
    grid = []
    for w, b in points[rank::size]:
        dec.set_weights(w, b)
        grid.append({"lm_weight": w, "word_score": b, "dev_wer": wer(dec.decode_batch)})
    if size > 1:
        from hpc_asr.dist.launch import mpi_comm

        parts = mpi_comm().gather(grid, root=0)  # dist: rank 0 collects every rank's grid points
        if rank != 0:
            return None
        order = {pt: i for i, pt in enumerate(points)}
        grid = sorted((g for p in parts for g in p), key=lambda g: order[g["lm_weight"], g["word_score"]])
    best = min(grid, key=lambda g: (g["dev_wer"], g["lm_weight"], abs(g["word_score"])))
    return {**best, "beam_size": beam, "token_beam": token_beam, "dev": dev, "checkpoint": ckpt,
            "dev_utterances": len(refs), "dev_wer_greedy": wer(lambda lp, ln: greedy_batch(lp, ln, tok)),
            "dev_wer_beam": wer(BeamDecoder(tok, beam, token_beam=token_beam).decode_batch), "ranks": size,
            "grid": grid}


def _glue_lists(argv: list[str]) -> list[str]:
    """``--word-scores -1,0,1`` → ``--word-scores=-1,0,1``: argparse reads a value that starts
    with '-' (and is not one plain number) as an option."""
    out = []
    for a in argv:
        if out and out[-1] in ("--word-scores", "--lm-weights") and a.startswith("-"):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hpc-asr lm tune",
                                description="tune LM weight and word bonus on dev; writes decode.json beside the LM")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the prepared DEV split")
    p.add_argument("--lm", required=True, type=Path, help="ARPA file (or directory holding lm.arpa)")
    p.add_argument("--lm-weights", default="0,0.25,0.5,0.75,1,1.5,2")
    p.add_argument("--word-scores", default="-2,-1,0,1,2,3")
    p.add_argument("--beam-size", type=int, default=32)
    p.add_argument("--token-beam", type=int, default=0, help="tokens tried per hypothesis and frame (0: all)")
    args = p.parse_args(_glue_lists(list(argv)))
    if args.beam_size < 1:
        p.error("--beam-size: must be >= 1")
    if args.token_beam < 0:
        p.error("--token-beam: must be >= 0")
    arpa = args.lm / "lm.arpa" if args.lm.is_dir() else args.lm
    from hpc_asr.dist.launch import detect_world

    world = detect_world()
    try:
        res = tune(args.checkpoint, args.data, arpa, _floats(args.lm_weights), _floats(args.word_scores),
                   args.beam_size, args.token_beam, world.rank, world.size)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if res is None:  # not rank 0
        return 0
    out = write_tuned(arpa, res, args.checkpoint)  # tied to this LM and this checkpoint by their SHA-256
    print(f"[lm] {out}: lm_weight {res['lm_weight']} word_score {res['word_score']} -> dev WER "
          f"{res['dev_wer']:.2%} (greedy {res['dev_wer_greedy']:.2%}, beam {res['dev_wer_beam']:.2%})",
          file=sys.stderr)
    return 0
