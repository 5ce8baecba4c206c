"""Tune the beam decoder's LM weight and word bonus on dev (grid search; posteriors computed once).

    hpc-asr lm tune --checkpoint runs/demo/last.pt --data data/va/fbank/dev --lm runs/demo/lm/lm.arpa
        # writes runs/demo/lm/decode.json
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


def tune(ckpt: str, dev: str, arpa: Path, weights: list[float], bonuses: list[float], beam: int) -> dict:
    """Grid search of (lm_weight, word_score) for the lowest dev WER; posteriors are computed
    once. Only dev is read: the test split never influences the weights."""
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

    dec = BeamDecoder(tok, beam, lm=LmFiles(arpa))
    grid = []
    for w in weights:
        for b in bonuses:
            dec.set_weights(w, b)
            grid.append({"lm_weight": w, "word_score": b, "dev_wer": wer(dec.decode_batch)})
    best = min(grid, key=lambda g: (g["dev_wer"], g["lm_weight"], abs(g["word_score"])))
    return {**best, "beam_size": beam, "dev": dev, "checkpoint": ckpt, "dev_utterances": len(refs),
            "dev_wer_greedy": wer(lambda lp, ln: greedy_batch(lp, ln, tok)),
            "dev_wer_beam": wer(BeamDecoder(tok, beam).decode_batch), "grid": grid}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hpc-asr lm tune",
                                description="tune LM weight and word bonus on dev; writes decode.json beside the LM")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the prepared DEV split")
    p.add_argument("--lm", required=True, type=Path, help="ARPA file (or directory holding lm.arpa)")
    p.add_argument("--lm-weights", default="0,0.25,0.5,0.75,1,1.5,2")
    p.add_argument("--word-scores", default="-2,-1,0,1,2,3")
    p.add_argument("--beam-size", type=int, default=32)
    args = p.parse_args(argv)
    arpa = args.lm / "lm.arpa" if args.lm.is_dir() else args.lm
    try:
        res = tune(args.checkpoint, args.data, arpa, _floats(args.lm_weights), _floats(args.word_scores),
                   args.beam_size)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    out = write_tuned(arpa, res, args.checkpoint)  # tied to this LM and this checkpoint by their SHA-256
    print(f"[lm] {out}: lm_weight {res['lm_weight']} word_score {res['word_score']} -> dev WER "
          f"{res['dev_wer']:.2%} (greedy {res['dev_wer_greedy']:.2%}, beam {res['dev_wer_beam']:.2%})",
          file=sys.stderr)
    return 0
