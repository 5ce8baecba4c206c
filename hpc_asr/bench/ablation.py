"""Reduced augmentation ablation: the demo pipeline (synth → augment → FBANK → train → evaluate)
run once per variant on a small corpus, scoring espeak-ng dev and the unseen-engine festival split.

    python -m hpc_asr bench ablation --config hpc_asr/configs/demo.yaml --out runs/ablation \\
        --data data/ablation --hours 1.0 --steps 800 --lock /tmp/cpu.lock

Every variant trains the same model for the same number of optimizer steps (``--steps``; the LR
schedule is fitted to it) from the same corpus; only the overrides of its row in ``VARIANTS``
differ. The stages are the toolkit's own commands, run as subprocesses exactly as ``make demo``
runs them (2 MPI ranks by default). ``--lock FILE`` holds an exclusive ``flock`` on FILE for each
variant's prep + training + scoring, so timings are not shared with other jobs. Writes
``OUT/ablation.json`` (one row per variant: WER/CER on dev and festival, greedy) and
``OUT/ablation.png``; a variant whose ``result.json`` matches its settings is not rerun.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from hpc_asr.atomic import atomic_path, write_json_atomic

__all__ = [
    "VARIANTS",
    "StageError",
    "locked",
    "main",
    "mpirun_prefix",
    "plot",
    "run_logged",
    "save_figure",
    "table",
    "variant_commands",
    "write_results",
]

# name -> config overrides (section.key=value) on top of --config; each variant sets augment.enabled.
VARIANTS: dict[str, tuple[str, ...]] = {
    "none": ("augment.enabled=false",),
    "speed": ("augment.enabled=true", "augment.noise_prob=0", "augment.reverb_prob=0"),
    "noise": ("augment.enabled=true", "augment.speeds=", "augment.reverb_prob=0"),
    "reverb": ("augment.enabled=true", "augment.speeds=", "augment.noise_prob=0"),
    "all": ("augment.enabled=true",),
    # generalisation candidates for an unseen engine (issue #8), each on top of "all"
    "all_warp0.2": ("augment.enabled=true", "specaug.freq_warp=0.2"),
    "all_speed_wide": ("augment.enabled=true", "augment.speeds=0.8,0.9,1.0,1.1,1.2"),
    "all_utt_cmvn": ("augment.enabled=true", "model.cmvn=utterance"),
    "all_utt_mean": ("augment.enabled=true", "model.cmvn=utterance_mean"),
    "all_copies2": ("augment.enabled=true", "augment.copies=2"),
    "all_seed1": ("augment.enabled=true", "train.seed=1"),  # "all" again with another seed: the noise floor
}
DEFAULT_VARIANTS = "none,speed,noise,reverb,all"
PREP_SECTIONS = ("augment.",)  # the overrides data_prep.augment takes


class StageError(RuntimeError):
    """A pipeline command failed; the message names it and its log."""


def mpirun_prefix(np_: int) -> list[str]:
    env = ["env", "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"] if os.getuid() == 0 else []
    return [*env, "mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(np_)]


def run_logged(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise StageError(f"exit {rc}: {' '.join(cmd[:12])} ... (log: {log})")


@contextmanager
def locked(path: str):
    """Exclusive flock(2) on ``path`` (what flock(1) takes), or nothing when ``path`` is empty."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def corpus_commands(args) -> list[list[str]]:
    """Synthesis of the reduced corpus and FBANK of its shared dev and festival splits."""
    py, d = sys.executable, Path(args.data)
    cmds = [[py, "-m", "hpc_asr", "prep", "voice-assistant", "--out", str(d), "--hours", str(args.hours), "--dev-utts",
             str(args.dev_utts), "--festival-utts", str(args.festival_utts), "--test-utts", "20"]]
    for split in ("dev", "test_festival"):
        cmds.append([*mpirun_prefix(args.np), py, "-m", "hpc_asr", "prep", "fbank", "--config", args.config,
                     "--manifest",
                     str(d / f"{split}.jsonl"), "--out", str(d / "fbank" / split)])
    return cmds


def variant_commands(name: str, overrides: tuple[str, ...], args) -> list[list[str]]:
    """The ``make demo`` stages for one variant: augment → FBANK → train → greedy dev/festival."""
    py, d, run = sys.executable, Path(args.data), Path(args.out) / name
    prep = [f"--{o}" for o in overrides if o.startswith(PREP_SECTIONS)]
    aug, feats = d / "variants" / name / "aug", d / "variants" / name / "fbank"
    mpi = mpirun_prefix(args.np)
    cmds = [
        [*mpi, py, "-m", "hpc_asr", "prep", "augment", "--config", args.config, "--manifest", str(d / "train.jsonl"),
         "--out", str(aug), *prep],
        [*mpi, py, "-m", "hpc_asr", "prep", "fbank", "--config", args.config, "--manifest", str(aug / "train.jsonl"),
         "--out", str(feats)],
        [*mpi, py, "-m", "hpc_asr", "train", "--config", args.config, "--train.out_dir", str(run),
         "--data.train", str(feats), "--data.dev", str(d / "fbank" / "dev"), "--train.epochs", "1000",
         "--train.max_steps", str(args.steps), "--train.time_budget_s", "0",
         "--train.tensorboard", "false", *(f"--{o}" for o in overrides)],
    ]
    for split, tag in (("dev", "dev"), ("test_festival", "festival")):
        cmds.append([*mpi, py, "-m", "hpc_asr", "evaluate", "--checkpoint", str(run / "last.pt"), "--data",
                     str(d / "fbank" / split), "--decoder", "greedy", "--out", str(run / f"eval_{tag}.json")])
    return cmds


def _fingerprint(name: str, overrides: tuple[str, ...], args) -> str:
    cfg = Path(args.config).read_bytes() if Path(args.config).is_file() else b""
    key = json.dumps([name, overrides, args.hours, args.dev_utts, args.festival_utts, args.steps, args.np])
    return hashlib.sha256(cfg + key.encode()).hexdigest()[:16]


def run_variant(name: str, args) -> dict:
    """Result row of one variant (reused when its result.json has the same fingerprint)."""
    overrides, run = VARIANTS[name], Path(args.out) / name
    fp, res_path = _fingerprint(name, VARIANTS[name], args), Path(args.out) / name / "result.json"
    if res_path.is_file() and json.loads(res_path.read_text()).get("fingerprint") == fp:
        return json.loads(res_path.read_text())
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(Path(args.data) / "variants" / name, ignore_errors=True)
    t0 = time.time()
    with locked(args.lock):
        t_locked = time.time()
        for cmd in variant_commands(name, overrides, args):
            run_logged(cmd, run / "ablation.log")
        wall = time.time() - t_locked
    row = {"variant": name, "overrides": list(overrides), "fingerprint": fp, "wall_s": round(wall, 1),
           "waited_for_lock_s": round(t_locked - t0, 1)}
    summary = json.loads((run / "train_summary.json").read_text())
    row.update(steps=summary.get("steps"), train_wall_s=summary.get("train_wall_s"),
               train_hours=summary.get("train_hours"))
    for tag in ("dev", "festival"):
        ev = json.loads((run / f"eval_{tag}.json").read_text())
        row.update({f"{tag}_wer": round(ev["wer"], 4), f"{tag}_cer": round(ev["cer"], 4),
                    f"{tag}_utterances": ev["utterances"]})
    write_json_atomic(res_path, row)
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: greedy WER on espeak-ng dev and on festival per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
    x = range(len(rows))
    for off, key, label in ((-0.2, "dev_wer", "espeak-ng dev"), (0.2, "festival_wer", "festival (unseen engine)")):
        vals = [100 * r[key] for r in rows]
        bars = ax.bar([i + off for i in x], vals, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("WER % (greedy)")
    ax.set_title("Augmentation ablation (reduced corpus, equal steps)")
    ax.set_ylim(0, 1.2 * max(100 * max(r["dev_wer"], r["festival_wer"]) for r in rows))
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, differences against the first row (the baseline)."""
    base = rows[0]
    out = ["| variant | overrides | espeak dev WER | dev CER | festival WER | festival CER | train h |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = [f" ({100 * (r[k] - base[k]):+.1f})" if r is not base else "" for k in
             ("dev_wer", "dev_cer", "festival_wer", "festival_cer")]
        out.append(f"| {r['variant']} | {' '.join(r['overrides'])} | {100 * r['dev_wer']:.1f}{d[0]} | "
                   f"{100 * r['dev_cer']:.1f}{d[1]} | {100 * r['festival_wer']:.1f}{d[2]} | "
                   f"{100 * r['festival_cer']:.1f}{d[3]} | {r['train_hours']:.2f} |")
    return "\n".join(out)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_results(out: Path, stem: str, setting: dict, rows: list[dict], plot_fn, table_fn) -> None:
    """OUT/STEM.json ({"setting", "variants"}), OUT/STEM.png, and the markdown table on stdout."""
    write_json_atomic(out / f"{stem}.json", {"setting": setting, "variants": rows})
    plot_fn(rows, out / f"{stem}.png")
    print(table_fn(rows))
    print(f"[{stem}] wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpc-asr bench ablation", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="hpc_asr/configs/demo.yaml")
    p.add_argument("--out", default="runs/ablation", help="one run folder per variant + ablation.json/png")
    p.add_argument("--data", default="data/ablation", help="reduced corpus and per-variant features")
    p.add_argument("--hours", type=float, default=1.0, help="training audio synthesised (espeak-ng only)")
    p.add_argument("--dev-utts", type=int, default=200)
    p.add_argument("--festival-utts", type=int, default=200)
    p.add_argument("--steps", type=int, default=800, help="optimizer steps per variant (all variants equal)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--np", type=int, default=2, help="MPI ranks per stage")
    p.add_argument("--lock", default="", help="hold flock(2) on this file during each variant (e.g. /tmp/cpu.lock)")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names or args.steps < 1 or args.hours <= 0:
        print(f"error: --variants {unknown or names} (known: {', '.join(VARIANTS)}), --steps >= 1, --hours > 0",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with locked(args.lock):
            for cmd in corpus_commands(args):
                run_logged(cmd, out / "corpus.log")
        rows = []
        for name in names:
            rows.append(run_variant(name, args))
            r = rows[-1]
            print(f"[ablation] {name}: dev {100 * r['dev_wer']:.1f} %  festival {100 * r['festival_wer']:.1f} %"
                  f"  ({r['steps']} steps, {r['wall_s']} s)", file=sys.stderr)
    except (StageError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    corpus = json.loads((Path(args.data) / "corpus.json").read_text())["splits"]
    setting = {"hours": args.hours, "train_utterances": corpus["train"]["utterances"],
               "train_hours": corpus["train"]["hours"], "dev_utterances": corpus["dev"]["utterances"],
               "festival_utterances": corpus["test_festival"]["utterances"], "steps": args.steps,
               "ranks": args.np, "config": args.config, "decoder": "greedy"}
    write_results(out, "ablation", setting, rows, plot, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
