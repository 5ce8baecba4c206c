"""Synthesize a voice-assistant speech corpus with several speech engines (and festival test/dev
splits) and write JSONL manifests.

Usage::

    python -m hpc_asr prep voice-assistant --out data/va --hours 3.0 --seed 0 [--engines espeak,mbrola,pico,rhvoice]
        [--jobs N] [--force] [--require-engines]
    mpirun -np 4 python -m hpc_asr prep voice-assistant --out data/va --hours 3.0   # split across ranks

Layout under OUT::

    wav/<split>/<id>.wav        16 kHz, mono, 16-bit PCM
    train.jsonl dev.jsonl test.jsonl test_festival.jsonl dev_festival.jsonl
    corpus.json                 summary (hours/utterances/speakers per split and engine, vocabulary, args)

Manifest lines are JSON objects ``{"id", "audio", "duration", "text", "speaker", "engine", "voice"}``
written by `hpc_asr.data.manifest` (which reads them).  ``audio`` is a path **relative to the
directory holding the manifest** (e.g. ``wav/train/train_000001.wav``), so a corpus can be moved or
copied as one folder.  ``duration`` is in seconds, ``text`` uses only ``[a-z' ]``, ``engine`` is
espeak, mbrola, pico, rhvoice or festival, ``voice`` that engine's voice, and ``speaker`` is
``"<accent>+<variant>"`` for espeak-ng and ``"<engine>+<voice>"`` for the others.

Engines (`engines`): ``--engines`` names the training engines (default espeak, what ``make demo``
uses); each takes turns utterance by utterance up to ``--hours``, and gets ``--dev-utts`` and
``--test-utts`` held-out sentences of its own.  An engine that is not installed is skipped with one
line on stderr (``--require-engines``: an error).  festival never speaks training audio:
``test_festival`` is the cross-engine test and ``dev_festival`` is for choosing settings only.

Held-out splits: dev and test hold out sentences and voices (see `plan`).

Modules: this driver (CLI, ranks, thread pool, manifests); `plan` (splits and per-utterance
settings); `engines` with `espeak`, `mbrola`, `pico`, `rhvoice` and `festival`; `audio` (run,
decode, resample, trim, level, write); `grammar` and `slots` (the sentences).

Speed matters because this is the first stage of ``make demo``: synthesizer processes run in a
thread pool (``--jobs``, default: CPU cores per local MPI rank), and under ``mpirun`` rank r
synthesizes utterances i with i % size == r; rank 0 gathers the results and writes the
manifests.  Everything (texts, voices, speed, pitch, silence, noise) is derived from
``--seed`` alone, so the corpus does not depend on the number of ranks or jobs.

Re-running with the same arguments is a no-op ("corpus up to date"); ``--force`` regenerates.
Exit status: 0 on success, 2 on a usage/environment error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_prep.recipes.voice_assistant import engines, festival, grammar
from data_prep.recipes.voice_assistant.audio import SAMPLE_RATE
from data_prep.recipes.voice_assistant.plan import CorpusError, Utt, plan_corpus
from hpc_asr.atomic import atomic_path
from hpc_asr.data.manifest import Utterance, write_manifest
from hpc_asr.dist.launch import detect_world

FORMAT_VERSION = 3  # 2: wider voices/ranges, word gaps, test_festival; 3: engines, engine/voice fields, dev_festival
SPLITS = ("train", "dev", "test", "test_festival", "dev_festival")


# ---------------------------------------------------------------------------------------
# MPI
# ---------------------------------------------------------------------------------------

def mpi_rank_size(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, ranks on this node); the launcher table lives in hpc_asr.dist.launch."""
    w = detect_world(env)
    return w.rank, w.size, w.local_size


class Comm:
    """The few collectives this script needs; a no-op stand-in when running alone."""

    def __init__(self, size: int):
        self.comm = None
        if size > 1:
            from mpi4py import MPI  # lazy: plain runs must not need an MPI library
            self.comm = MPI.COMM_WORLD

    def bcast(self, obj):
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def gather(self, obj):
        return [obj] if self.comm is None else self.comm.gather(obj, root=0)

    def abort(self, code: int) -> None:
        if self.comm is not None:
            self.comm.Abort(code)



class Progress:
    """Prints a line to stderr at every ~10% of this rank's work (rank 0 only)."""

    def __init__(self, total: int, enabled: bool, note: str = ""):
        self.total, self.enabled, self.note = total, enabled, note
        self.done, self.seconds, self.next_mark = 0, 0.0, 0.1
        self.start = time.monotonic()

    def update(self, row: dict) -> None:
        self.done += 1
        self.seconds += row.get("duration", 0.0)
        if self.enabled and (self.done >= self.next_mark * self.total or
                             self.done == self.total):
            while self.next_mark * self.total <= self.done:
                self.next_mark += 0.1
            print(f"[synth] {self.done}/{self.total} utterances{self.note}, "
                  f"{self.seconds / 3600:.2f} h audio, "
                  f"{time.monotonic() - self.start:.1f} s", file=sys.stderr, flush=True)


def synthesize_all(utts: list[Utt], out: Path, seed: int, jobs: int,
                   progress: Progress) -> list[dict]:
    """Render `utts` on a thread pool: one task per utterance (the work is in the synthesizer
    processes; Pico runs in-process) and one per festival batch."""
    fest = [u for u in utts if u.engine == festival.NAME]
    tasks: list = [[u] for u in utts if u.engine != festival.NAME]
    tasks += [fest[i:i + festival.FESTIVAL_BATCH] for i in range(0, len(fest), festival.FESTIVAL_BATCH)]

    def render(task: list[Utt]) -> list[dict]:
        if task[0].engine == festival.NAME:
            return festival.synthesize_festival(task, out, seed)
        return [engines.synthesize(task[0], out, seed)]

    rows = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for part in pool.map(render, tasks):
            for row in part:
                rows.append(row)
                progress.update(row)
    return rows


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_manifests(out: Path, rows: list[dict]) -> dict[str, list[dict]]:
    """One JSONL per split, in id order, through `hpc_asr.data.manifest`; returns the rows grouped by split."""
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in sorted(rows, key=lambda r: r["id"]):
        by_split[row["split"]].append(row)
    for split, split_rows in by_split.items():
        write_manifest(out / f"{split}.jsonl", [Utterance(r["id"], r["audio"], r["text"], r["duration"], r["speaker"],
                                                          r["engine"], r["voice"]) for r in split_rows])
    return by_split


def corpus_summary(by_split: dict[str, list[dict]], failed: list[dict], key: dict,
                   voices: dict, elapsed: float) -> dict:
    texts = [r["text"] for rows in by_split.values() for r in rows]
    return {
        "args": key,
        "seed": key["seed"],
        "splits": {s: {"utterances": len(rows),
                       "hours": round(sum(r["duration"] for r in rows) / 3600, 4),
                       "speakers": len({r["speaker"] for r in rows}),
                       "vocabulary": len(grammar.vocabulary([r["text"] for r in rows])),
                       "engines": {e: {"utterances": sum(r["engine"] == e for r in rows),
                                       "hours": round(sum(r["duration"] for r in rows if r["engine"] == e) / 3600, 4)}
                                   for e in sorted({r["engine"] for r in rows})}}
                   for s, rows in by_split.items()},
        "vocabulary_size": len(grammar.vocabulary(texts)),
        "voices": voices,
        "failed": [{"id": f["id"], "error": f["error"]} for f in failed],
        "manifest_audio_paths": "relative to the manifest's directory",
        "sample_rate": SAMPLE_RATE,
        "elapsed_s": round(elapsed, 1),
    }


def is_up_to_date(out: Path, key: dict) -> bool:
    """True if OUT holds a finished corpus made with the same arguments and every engine they asked for (an
    engine skipped as missing may have been installed since)."""
    try:
        summary = json.loads((out / "corpus.json").read_text())
    except (OSError, ValueError):
        return False
    return (summary.get("args") == key and set(summary.get("voices", {})) >= {e.split(":")[0] for e in key["engines"]}
            and all((out / f"{s}.jsonl").is_file() for s in SPLITS))


def clear_outputs(out: Path) -> None:
    """Remove what an earlier run left (only files this script writes)."""
    for name in ["corpus.json"] + [f"{s}.jsonl" for s in SPLITS]:
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out / "wav" / split, ignore_errors=True)
        (out / "wav" / split).mkdir(parents=True)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (exit status 2 as usual)."""

    def error(self, message: str):
        self.exit(2, f"synth: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="hpc-asr prep voice-assistant", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--hours", type=float, default=3.0, help="training audio to make (approx.)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev-utts", type=int, default=200)
    p.add_argument("--test-utts", type=int, default=200)
    p.add_argument("--festival-utts", type=int, default=200,
                   help="held-out sentences spoken by festival (split test_festival; 0 = none)")
    p.add_argument("--festival-dev-utts", type=int, default=0,
                   help="festival sentences for choosing settings only (split dev_festival; 0 = none, the "
                        "demo's default: nothing is tuned on it yet)")
    p.add_argument("--engines", default=",".join(engines.DEFAULT_ENGINES),
                   help=f"training engines, comma-separated, from {','.join(engines.TRAINING_ENGINES)}, each "
                        "with an optional :WEIGHT, its share of the training utterances (espeak:3,mbrola: three "
                        "espeak-ng utterances for each MBROLA one; default: %(default)s); --dev-utts and "
                        "--test-utts are per engine")
    p.add_argument("--require-engines", action="store_true",
                   help="a missing engine is an error (default: skipped with one line on stderr)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel synthesizer processes per rank (default: cores / local ranks)")
    p.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = p.parse_args(argv)
    if min(args.hours, args.dev_utts, args.test_utts, args.festival_utts, args.festival_dev_utts) < 0:
        p.error("--hours, --dev-utts, --test-utts, --festival-utts and --festival-dev-utts must be >= 0")
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be >= 1")
    try:
        args.weights = engines.parse_engines(args.engines)
        args.engines = list(args.weights)
    except ValueError as exc:
        p.error(f"--engines: {exc}")
    return args


def run(args: argparse.Namespace, rank: int, size: int, local_size: int, comm: Comm) -> int:
    start = time.monotonic()
    out: Path = args.out.resolve()
    key = {"hours": args.hours, "seed": args.seed, "dev_utts": args.dev_utts, "test_utts": args.test_utts,
           "festival_utts": args.festival_utts, "festival_dev_utts": args.festival_dev_utts,
           "engines": [e if w == 1 else f"{e}:{w}" for e, w in args.weights.items()], "format_version": FORMAT_VERSION}
    if not args.force and is_up_to_date(out, key):
        if rank == 0:
            print("corpus up to date", file=sys.stderr)
        return 0
    voices, missing = engines.find_voices(args.engines, args.seed, bool(args.festival_utts or args.festival_dev_utts),
                                          args.require_engines)
    if rank == 0:
        for line in missing:
            print(f"[synth] {line}", file=sys.stderr)
    utts = plan_corpus(voices, engines.prosody(args.engines), args.hours, args.dev_utts, args.test_utts, args.seed,
                       args.festival_utts, args.festival_dev_utts, weights=args.weights)
    problem = None
    if rank == 0:
        try:
            clear_outputs(out)
        except OSError as exc:
            problem = f"cannot write to {out}: {exc}"
    problem = comm.bcast(problem)   # doubles as the barrier before anyone writes audio
    if problem:
        raise CorpusError(problem)

    mine = utts[rank::size]
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // max(1, local_size))
    note = f" (rank 0 of {size})" if size > 1 else ""
    rows = synthesize_all(mine, out, args.seed, jobs, Progress(len(mine), rank == 0, note))
    gathered = comm.gather(rows)
    if rank != 0:
        return 0

    rows = [r for part in gathered for r in part]
    failed = [r for r in rows if "error" in r]
    for f in failed:
        print(f"[synth] skipped {f['id']}: {f['error']}", file=sys.stderr)
    by_split = write_manifests(out, [r for r in rows if "error" not in r])
    summary = corpus_summary(by_split, failed, key, voices, time.monotonic() - start)
    _write_atomic(out / "corpus.json", json.dumps(summary, indent=2) + "\n")
    parts = ", ".join(f"{s} {v['utterances']} utts {v['hours']:.2f} h"
                      for s, v in summary["splits"].items())
    print(f"[synth] wrote {out}: {parts}; vocabulary {summary['vocabulary_size']}; "
          f"{len(failed)} skipped; {summary['elapsed_s']} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, size, local_size = mpi_rank_size()
    try:
        comm = Comm(size)
    except ImportError as exc:
        print(f"synth: error: {size} MPI ranks need mpi4py ({exc})", file=sys.stderr)
        return 2
    try:
        return run(args, rank, size, local_size, comm)
    except CorpusError as exc:
        if rank == 0:
            print(f"synth: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        comm.abort(1)   # do not leave other ranks waiting in a collective
        raise


if __name__ == "__main__":
    sys.exit(main())
