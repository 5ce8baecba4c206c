"""Which synthesizers to train on: the engine ablation on a reduced multi-engine corpus.

    python -m hpc_asr bench voices --config hpc_asr/configs/demo.yaml --out runs/voices \\
        --data data/voices --hours 2.0 --steps 400 [--variants espeak,+mbrola,...] [--lock /tmp/cpu.lock]

One pool corpus is synthesised with every training engine (equal shares) plus festival's dev
split (``dev_festival``: the engine never trained on, for choosing settings). Each variant
trains the same model for the same optimizer steps on the same hours of audio (``--hours`` / the
number of engines in the pool, drawn equally from the variant's engines in corpus order), and is
scored greedy on the pool's dev split (held-out sentences and voices of every engine, split by
engine) and on festival dev. Variants (``VARIANTS``): espeak-ng alone, then MBROLA, Pico and
RHVoice added one at a time, all four + the augmented copy, and each engine left out (scored on
the engine left out). Writes ``OUT/voices.json``, ``OUT/voices.png`` and prints a markdown table; a
variant whose ``result.json`` matches its settings is not rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from hpc_asr.atomic import write_json_atomic
from hpc_asr.bench.ablation import StageError, locked, mpirun_prefix, run_logged, save_figure, write_results
from hpc_asr.bench.report import by_engine
from hpc_asr.data.manifest import read_manifest, write_manifest

__all__ = ["ENGINES", "VARIANTS", "main", "subset", "table"]

ENGINES = ("espeak", "mbrola", "pico", "rhvoice")
# name -> (training engines, augmented copy)
VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "espeak": (("espeak",), False),
    "+mbrola": (("espeak", "mbrola"), False),
    "+pico": (("espeak", "mbrola", "pico"), False),        # = leave RHVoice out
    "+rhvoice": (ENGINES, False),                           # all four
    "all+aug": (ENGINES, True),
    "-espeak": (("mbrola", "pico", "rhvoice"), False),
    "-mbrola": (("espeak", "pico", "rhvoice"), False),
    "-pico": (("espeak", "mbrola", "rhvoice"), False),
}
DEFAULT_VARIANTS = ",".join(VARIANTS)


def subset(pool: list, engines: tuple[str, ...], seconds: float) -> list:
    """``seconds`` of training audio, an equal share from each engine, in corpus order."""
    share, out = seconds / len(engines), []
    for e in engines:
        left = share
        for u in (u for u in pool if u.engine == e):
            if left <= 0:
                break
            out.append(u)
            left -= u.duration
        if left > 0.05 * share:
            raise ValueError(f"engine {e}: the pool has too little audio for a {share:.0f} s share (more --hours)")
    return out


def corpus_commands(args) -> list[list[str]]:
    py, d = sys.executable, Path(args.data)
    cmds = [[py, "-m", "hpc_asr", "prep", "voice-assistant", "--out", str(d), "--hours", str(args.hours),
             "--engines", ",".join(ENGINES), "--require-engines", "--dev-utts", str(args.dev_utts), "--test-utts", "0",
             "--festival-utts", "0", "--festival-dev-utts", str(args.festival_utts)]]
    for split in ("dev", "dev_festival"):
        cmds.append([*mpirun_prefix(args.np), py, "-m", "hpc_asr", "prep", "fbank", "--config", args.config,
                     "--manifest", str(d / f"{split}.jsonl"), "--out", str(d / "fbank" / split)])
    return cmds


def variant_commands(name: str, args) -> list[list[str]]:
    """augment (or not) → FBANK → train → greedy dev and festival dev, as ``make demo`` runs them."""
    py, d, run = sys.executable, Path(args.data), Path(args.out) / name
    _, aug = VARIANTS[name]
    v = d / "variants" / name
    mpi = mpirun_prefix(args.np)
    cmds = [
        [*mpi, py, "-m", "hpc_asr", "prep", "augment", "--config", args.config, "--manifest", str(v / "train.jsonl"),
         "--out", str(v / "aug"), f"--augment.enabled={str(aug).lower()}"],
        [*mpi, py, "-m", "hpc_asr", "prep", "fbank", "--config", args.config, "--manifest",
         str(v / "aug" / "train.jsonl"), "--out", str(v / "fbank")],
        [*mpi, py, "-m", "hpc_asr", "train", "--config", args.config, "--train.out_dir", str(run),
         "--data.train", str(v / "fbank"), "--data.dev", str(d / "fbank" / "dev"), "--train.epochs", "1000",
         "--train.max_steps", str(args.steps), "--train.time_budget_s", "0",
         "--train.tensorboard", "false", f"--augment.enabled={str(aug).lower()}"],
    ]
    for split, tag in (("dev", "dev"), ("dev_festival", "festival")):
        cmds.append([*mpi, py, "-m", "hpc_asr", "evaluate", "--checkpoint", str(run / "last.pt"), "--data",
                     str(d / "fbank" / split), "--decoder", "greedy", "--out", str(run / f"eval_{tag}.json")])
    return cmds


def _fingerprint(name: str, args) -> str:
    cfg = Path(args.config).read_bytes() if Path(args.config).is_file() else b""
    key = json.dumps([name, VARIANTS[name], args.hours, args.dev_utts, args.festival_utts, args.steps, args.np])
    return hashlib.sha256(cfg + key.encode()).hexdigest()[:16]


def run_variant(name: str, args) -> dict:
    engines, aug = VARIANTS[name]
    run, d = Path(args.out) / name, Path(args.data)
    fp, res_path = _fingerprint(name, args), run / "result.json"
    if res_path.is_file() and json.loads(res_path.read_text()).get("fingerprint") == fp:
        return json.loads(res_path.read_text())
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(d / "variants" / name, ignore_errors=True)
    pool = read_manifest(d / "train.jsonl")
    seconds = 3600 * args.hours / len(ENGINES)
    write_manifest(d / "variants" / name / "train.jsonl", subset(pool, engines, seconds))
    with locked(args.lock):
        t0 = time.time()
        for cmd in variant_commands(name, args):
            run_logged(cmd, run / "voices.log")
        wall = time.time() - t0
    summary = json.loads((run / "train_summary.json").read_text())
    dev, fest = (json.loads((run / f"eval_{t}.json").read_text()) for t in ("dev", "festival"))
    engine_of = {u.id: u.engine for u in read_manifest(d / "dev.jsonl")}
    rows = [(i, h["ref"], h["hyp"]) for i, h in dev["hypotheses"].items()]
    left_out = [e for e in ENGINES if e not in engines]
    row = {"variant": name, "engines": list(engines), "augmented": aug, "fingerprint": fp, "wall_s": round(wall, 1),
           "steps": summary.get("steps"), "train_hours": summary.get("train_hours"),
           "dev_wer_by_engine": by_engine(rows, engine_of), "dev_wer": round(dev["wer"], 4),
           "festival_wer": round(fest["wer"], 4), "festival_cer": round(fest["cer"], 4),
           "left_out": left_out[0] if len(left_out) == 1 else None}
    write_json_atomic(res_path, row)
    return row


def table(rows: list[dict]) -> str:
    """Markdown: festival dev and each engine's dev WER per variant (greedy); * = not trained on."""
    out = ["| variant | trained on | train h | festival dev | " + " | ".join(f"{e} dev" for e in ENGINES) + " |",
           "|---|---|---|---|" + "---|" * len(ENGINES)]
    for r in rows:
        cells = [f"{100 * r['dev_wer_by_engine'][e]:.1f}{'' if e in r['engines'] else '*'}"
                 if e in r["dev_wer_by_engine"] else "–" for e in ENGINES]
        out.append(f"| {r['variant']} | {'+'.join(r['engines'])}{' +aug' if r['augmented'] else ''} | "
                   f"{r['train_hours']:.2f} | {100 * r['festival_wer']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Festival dev WER and the mean over the trained engines' dev WER, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    x = range(len(rows))
    series = (("festival dev (never trained on)", [100 * r["festival_wer"] for r in rows]),
              ("espeak-ng dev", [100 * r["dev_wer_by_engine"].get("espeak", float("nan")) for r in rows]),
              ("left-out engine's dev", [100 * r["dev_wer_by_engine"][r["left_out"]] if r["left_out"] else float("nan")
                                         for r in rows]))
    for k, (label, vals) in enumerate(series):
        bars = ax.bar([i + (k - 1) * 0.27 for i in x], vals, width=0.27, label=label)
        ax.bar_label(bars, labels=["" if v != v else f"{v:.0f}" for v in vals], fontsize=7)  # v != v: NaN
    ax.set_xticks(list(x), [r["variant"] for r in rows], rotation=20)
    ax.set_ylabel("WER % (greedy)")
    ax.set_title("Training engines (equal hours and steps per variant)")
    ax.set_ylim(0, 115)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpc-asr bench voices", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="hpc_asr/configs/demo.yaml")
    p.add_argument("--out", default="runs/voices", help="one run folder per variant + voices.json/png")
    p.add_argument("--data", default="data/voices", help="the pool corpus and per-variant features")
    p.add_argument("--hours", type=float, default=2.0,
                   help="pool training audio, all engines; each variant trains on hours / 4 of it")
    p.add_argument("--dev-utts", type=int, default=60, help="dev sentences per engine")
    p.add_argument("--festival-utts", type=int, default=150, help="festival dev sentences")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per variant (all variants equal)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--np", type=int, default=2, help="MPI ranks per stage")
    p.add_argument("--lock", default="", help="hold flock(2) on this file during each variant")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        p.error(f"--variants: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(VARIANTS)})")
    if args.steps < 1 or args.hours <= 0:
        p.error("--steps must be >= 1 and --hours > 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        with locked(args.lock):
            for cmd in corpus_commands(args):
                run_logged(cmd, out / "corpus.log")
        for name in names:
            rows.append(run_variant(name, args))
            r = rows[-1]
            print(f"[voices] {name}: festival dev {100 * r['festival_wer']:.1f} %, dev by engine "
                  + ", ".join(f"{e} {100 * w:.1f} %" for e, w in r["dev_wer_by_engine"].items())
                  + f" ({r['steps']} steps, {r['wall_s']} s)", file=sys.stderr)
    except (StageError, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    setting = {"pool_hours": args.hours, "variant_hours": args.hours / len(ENGINES), "steps": args.steps,
               "ranks": args.np, "config": args.config, "decoder": "greedy",
               "dev_utterances_per_engine": args.dev_utts, "festival_dev_utterances": args.festival_utts}
    write_results(out, "voices", setting, rows, plot, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
