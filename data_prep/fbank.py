"""Compute FBANK for a JSONL manifest across MPI ranks: bounded HDF5 shards, index, CMVN, rejects.

    mpirun -np 64 python -m hpc_asr prep fbank --manifest train.jsonl --out /lustre/asr/fbank/train

The manifest is cut into work units of ~``--unit-seconds`` of audio (a fixed list, whatever the
number of ranks). Ranks claim units dynamically (an exclusive create of one claim file per unit),
so a slow rank just takes fewer. Each rank streams its units into a shard and starts a new one
when the next unit would pass the size cap; a shard is renamed into place only when complete, and
records the units it holds, their CMVN sums and their rejects. Hence:

- resume: after ``kill -9`` of a rank or the job, the same command redoes only the units that are
  in no finished shard (no utterance lost or doubled); a finished directory is a no-op;
- ``--force`` builds a new generation directory; ``index.json``, written last and atomically,
  switches to it in one step, so the index never describes a mix of old and new shards;
- an ``--out`` that holds (or is preparing) the features of another manifest is refused with one
  line naming it, unless ``--force``: a typo in ``--out`` never replaces another corpus;
- bad audio (unreadable, truncated, empty, too short or long, NaN, unusable rate) is skipped and
  listed in ``OUT/rejects.jsonl``; the exit status is 3 when rejects exceed
  ``--max-reject-fraction``. Other rates and channel counts are converted with soxr;
- any exception on any rank ends the whole job with one line (MPI_Abort), never a hang.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hpc_asr.atomic import atomic_path, write_json_atomic
from hpc_asr.cli import load_config
from hpc_asr.config import ConfigError, FeatureConfig
from hpc_asr.data.features import AudioError, CmvnStats, fbank, load_audio, resample
from hpc_asr.data.manifest import ManifestError, Utterance, read_manifest
from hpc_asr.data.shards import DEFAULT_MAX_BYTES, ShardWriter, open_h5, read_index, write_index
from hpc_asr.dist.launch import World, detect_world, log0, mpi_comm

KILL_ENV = "HPC_ASR_TEST_KILL_AFTER_UNITS"  # "RANK:N": SIGKILL that rank after N units (tests only)
SLOW_ENV = "HPC_ASR_TEST_SLOW_RANK"  # "RANK:SECONDS": that rank sleeps this long per unit (tests only)


class RejectsError(RuntimeError):
    """Too many utterances were rejected; the index is written, the exit status says so."""


class OutDirInUse(ValueError):
    """--out holds the features of another manifest (exit 2, nothing touched)."""


@dataclass
class PrepOptions:
    """How the prep cuts, caps and checks its work (not part of the features themselves)."""

    max_shard_bytes: int = DEFAULT_MAX_BYTES  # a new shard starts before this many bytes of frames
    max_shard_utts: int = 0  # and/or this many utterances (0 = no limit)
    unit_seconds: float = 600.0  # audio per work unit: the grain of balancing and of resume
    speeds: tuple[float, ...] = (1.0,)  # speed perturbation copies, e.g. (0.9, 1.0, 1.1)
    max_reject_fraction: float = 0.01  # exit 3 when more of the inputs are rejected
    device: str = "cpu"  # torch FBANK on this device (cuda on GPU nodes)
    force: bool = False

    def fingerprint_fields(self) -> dict:
        return {"max_shard_bytes": self.max_shard_bytes, "max_shard_utts": self.max_shard_utts,
                "unit_seconds": self.unit_seconds, "speeds": list(self.speeds)}


def _fingerprint(manifest: Path, features: FeatureConfig, opts: PrepOptions) -> str:
    h = hashlib.sha1(manifest.read_bytes())
    h.update(json.dumps([asdict(features), opts.fingerprint_fields()], sort_keys=True).encode())
    return h.hexdigest()[:16]


def plan_units(utts: list[Utterance], unit_seconds: float) -> list[list[Utterance]]:
    """Consecutive runs of ~unit_seconds of audio, in manifest order (deterministic, so a rerun
    with any number of ranks sees the same units). Unknown durations count as 1 s."""
    units, cur, acc = [], [], 0.0
    for u in utts:
        cur.append(u)
        acc += u.duration if u.duration > 0 else 1.0
        if acc >= unit_seconds:
            units.append(cur)
            cur, acc = [], 0.0
    return units + ([cur] if cur else [])


# ---------------------------------------------------------------- one utterance


def featurize(u: Utterance, features: FeatureConfig, speeds, device: str = "cpu"):
    """[(id, feats, duration)] per speed; AudioError names what is wrong with the audio."""
    x = load_audio(u.audio, features.sample_rate, convert=True)
    sr = features.sample_rate
    if features.max_duration > 0 and len(x) > features.max_duration * sr:
        raise AudioError(f"{u.audio}: {len(x) / sr:.1f} s is longer than features.max_duration="
                         f"{features.max_duration:g}")
    out = []
    for s in speeds:
        # Speed s plays the audio s times faster: read it as if recorded at sr * s, bring it to sr.
        y = x if s == 1.0 else resample(x, sr * s, sr, u.audio)
        try:
            feats = fbank(y, features, device)
        except AudioError as e:
            raise AudioError(f"{u.audio}: too short ({e})") from None
        out.append((u.id if s == 1.0 else f"sp{s:g}-{u.id}", feats, len(y) / sr))
    return out


# ---------------------------------------------------------------- one rank's work


class _RankWork:
    """Claims units, featurizes them and streams them into size-capped shards."""

    def __init__(self, gen_dir: Path, claims: Path, features: FeatureConfig, opts: PrepOptions, world: World):
        self.gen_dir, self.claims, self.features, self.opts, self.world = gen_dir, claims, features, opts, world
        self.writer: ShardWriter | None = None
        self.units_done, self.audio_s = 0, 0.0

    def _claim(self, u: int) -> bool:
        try:
            os.close(os.open(self.claims / f"unit-{u:06d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def _close(self) -> None:
        if self.writer is None:
            return
        w, self.writer = self.writer, None
        w.set_extra("units", np.array(self._units, np.int64))
        w.set_extra("cmvn_sum", self._cmvn.sum)
        w.set_extra("cmvn_sumsq", self._cmvn.sumsq)
        w.set_extra("rejects", [json.dumps(r) for r in self._rejects])
        w.close()

    def _writer_for(self, u: int, unit: list[Utterance]) -> ShardWriter:
        bins, copies = self.features.num_mel_bins, len(self.opts.speeds)
        est_bytes = sum(max(x.duration, 0.0) for x in unit) * copies * 4 * bins * 1000 / self.features.frame_shift_ms
        w, cap_utts = self.writer, self.opts.max_shard_utts
        if w is not None and len(w) and (w.frames * bins * 4 + est_bytes > self.opts.max_shard_bytes
                                         or (cap_utts and len(w) + len(unit) * copies > cap_utts)):
            self._close()
        if self.writer is None:
            self.writer = ShardWriter(self.gen_dir / f"shard-{u:06d}.h5", self.features,
                                      {"rank": self.world.rank, "size": self.world.size},
                                      self.opts.max_shard_bytes, cap_utts)
            self._units, self._cmvn, self._rejects = [], CmvnStats.zeros(self.features.num_mel_bins), []
        return self.writer

    def do_unit(self, u: int, unit: list[Utterance]) -> None:
        w = self._writer_for(u, unit)
        for utt in unit:
            try:
                copies = featurize(utt, self.features, self.opts.speeds, self.opts.device)
            except AudioError as e:
                print(f"[fbank] {self.world.tag} rejected {utt.id}: {e}", file=sys.stderr, flush=True)
                self._rejects += [{"id": utt.id, "audio": utt.audio, "reason": str(e),
                                   "copies": len(self.opts.speeds)}]
                continue
            for utt_id, feats, dur in copies:
                w.add(utt_id, feats, utt.text, utt.speaker, round(dur, 4))
                self._cmvn.add(feats)
                self.audio_s += dur
        self._units.append(u)
        self.units_done += 1
        _test_hooks(self.world.rank, self.units_done)
        if w.full:
            self._close()

    def run(self, units: list[list[Utterance]], todo: list[int]) -> None:
        start = self.world.rank * len(todo) // self.world.size  # ranks start apart: few lost claims
        try:
            for u in todo[start:] + todo[:start]:
                if self._claim(u):
                    self.do_unit(u, units[u])
            self._close()
        finally:
            if self.writer is not None:
                self.writer.abort()


def _test_hooks(rank: int, units_done: int) -> None:
    """A rank killed mid-prep, or slower than the others: real conditions, triggered on demand."""
    kill = os.environ.get(KILL_ENV, "")
    if kill and kill.split(":") == [str(rank), str(units_done)]:
        os.kill(os.getpid(), signal.SIGKILL)
    slow = os.environ.get(SLOW_ENV, "").split(":")
    if slow[0] == str(rank):
        time.sleep(float(slow[1]))


# ---------------------------------------------------------------- rank 0: state on disk


def _scan(gen_dir: Path) -> dict:
    """What the finished shards of a generation hold. Leftover temp files are removed."""
    for tmp in gen_dir.glob(".shard-*.tmp*"):
        tmp.unlink(missing_ok=True)
    state = {"units": {}, "rows": [], "rejects": [], "sum": 0.0, "sumsq": 0.0, "frames": 0}
    for path in sorted(gen_dir.glob("shard-*.h5")):
        with open_h5(path) as h5:
            units = h5["units"][:].tolist()
            for u in units:
                if u in state["units"]:
                    raise RuntimeError(f"{path}: unit {u} also in {state['units'][u]}")
                state["units"][u] = path.name
            state["rows"].append({"file": f"{gen_dir.name}/{path.name}", "utterances": int(h5.attrs["utterances"]),
                                  "frames": int(h5.attrs["frames"]), "bytes": path.stat().st_size,
                                  "checksum": str(h5.attrs["checksum"])})
            state["rejects"] += [json.loads(r) for r in h5["rejects"].asstr()[:]]
            state["sum"] = state["sum"] + h5["cmvn_sum"][:]
            state["sumsq"] = state["sumsq"] + h5["cmvn_sumsq"][:]
            state["frames"] += int(h5.attrs["frames"])
    return state


def _decide(out: Path, manifest: Path, fingerprint: str, force: bool) -> dict:
    """Rank 0: no-op, resume the pending generation, or start a new one. A directory that holds
    (or is preparing) another manifest is refused unless ``force``."""
    index_path, pending_path = out / "index.json", out / "pending.json"
    index = {}
    if index_path.is_file():
        with contextlib.suppress(ValueError, FileNotFoundError, KeyError):
            index = read_index(out)
    pending = json.loads(pending_path.read_text()) if pending_path.is_file() else {}
    for holder, source in ((index, "index.json"), (pending, "pending.json")):
        other = holder.get("manifest")
        if not force and other and other != str(manifest.resolve()):
            raise OutDirInUse(f"{out} holds the features of {other} ({source}): use another --out, "
                              "or --force to replace them")
    if not force and index.get("fingerprint") == fingerprint:
        return {"noop": True, "index": index}
    if force or pending.get("fingerprint") != fingerprint or not (out / pending.get("generation", "-")).is_dir():
        pending = {"generation": f"gen-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}",
                   "fingerprint": fingerprint, "manifest": str(manifest.resolve())}
        (out / pending["generation"]).mkdir(parents=True)
        write_json_atomic(pending_path, pending)
    gen_dir = out / pending["generation"]
    done = sorted(_scan(gen_dir)["units"])
    attempt = f"claims-{uuid.uuid4().hex[:8]}"
    (gen_dir / attempt).mkdir()
    return {"noop": False, "generation": pending["generation"], "done": done, "attempt": attempt}


def _finalize(out: Path, gen: str, n_units: int, n_inputs: int, features: FeatureConfig, extra: dict) -> dict:
    """Rank 0, after every rank finished: rejects.jsonl, then index.json (the switch), then cleanup."""
    state = _scan(out / gen)
    missing = sorted(set(range(n_units)) - set(state["units"]))
    if missing:
        raise RuntimeError(f"{out / gen}: units {missing[:5]} are in no shard after all ranks finished")
    if state["frames"] == 0:
        raise ValueError(f"{extra['manifest']}: no utterance could be featurized; see {out / 'rejects.jsonl'}")
    rejects = state["rejects"]
    with atomic_path(out / "rejects.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rejects))
    rejected = sum(r.get("copies", 1) for r in rejects)
    index = write_index(out, features, state["rows"], (state["sum"], state["sumsq"], state["frames"]),
                        generation=gen, rejected=rejected, inputs=n_inputs, units=n_units, **extra)
    for old in out.glob("gen-*"):
        if old.name != gen:
            shutil.rmtree(old, ignore_errors=True)
    for legacy in out.glob("shard-*.h5"):  # version-1 layout: shards beside the index
        legacy.unlink(missing_ok=True)
    for claims in (out / gen).glob("claims-*"):
        shutil.rmtree(claims, ignore_errors=True)
    (out / "pending.json").unlink(missing_ok=True)
    return index


def check_rejects(index: dict, out: Path, max_fraction: float) -> None:
    inputs = max(int(index.get("inputs", index["utterances"])), 1)
    if index.get("rejected", 0) > max_fraction * inputs:
        raise RejectsError(f"{index['rejected']} of {inputs} utterances rejected ({index['rejected'] / inputs:.1%}"
                           f" > --max-reject-fraction {max_fraction:g}); see {out / 'rejects.jsonl'}")


# ---------------------------------------------------------------- the job


def run(manifest: Path, out: Path, features: FeatureConfig, world: World, comm,
        opts: PrepOptions | None = None) -> dict:
    """Prep ``manifest`` into ``out``; every rank calls it. Returns the index (rank 0) or {}."""
    opts = opts or PrepOptions()
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest not found")
    utts = read_manifest(manifest)
    fingerprint = _fingerprint(manifest, features, opts)
    decision = None
    if world.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        decision = _decide(out, manifest, fingerprint, opts.force)
    _idle_wait(comm)  # dist: rank 0 may scan many shards first
    if comm is not None:
        decision = comm.bcast(decision, root=0)  # dist: every rank takes the same branch
    if decision["noop"]:
        log0(world, f"[fbank] {out}/index.json up to date; nothing to do (--force to redo)")
        if world.rank == 0:
            check_rejects(decision["index"], out, opts.max_reject_fraction)
        return decision["index"] if world.rank == 0 else {}
    units = plan_units(utts, opts.unit_seconds)
    done = set(decision["done"])
    todo = [u for u in range(len(units)) if u not in done]
    gen_dir = out / decision["generation"]
    log0(world, f"[fbank] {len(utts)} utterances in {len(units)} units; {len(todo)} to do on {world.size} ranks")
    t0 = time.time()
    work = _RankWork(gen_dir, gen_dir / decision["attempt"], features, opts, world)
    work.run(units, todo)
    mine = (round(time.time() - t0, 3), work.units_done, round(work.audio_s, 2))
    _idle_wait(comm)
    ranks = [mine] if comm is None else comm.gather(mine, root=0)  # dist: all ranks finished
    index = {}
    if world.rank == 0:
        extra = {"fingerprint": fingerprint, "manifest": str(manifest.resolve()), "ranks": world.size,
                 "speeds": list(opts.speeds), "wall_s": round(time.time() - t0, 2),
                 "rank_stats": [{"wall_s": w, "units": n, "audio_s": a} for w, n, a in ranks]}
        index = _finalize(out, decision["generation"], len(units), len(utts) * len(opts.speeds), features, extra)
        log0(world, f"[fbank] wrote {out}: {index['utterances']} utterances, {index['hours']:.2f} h, "
                    f"{len(index['shards'])} shards, {index['rejected']} rejected, {index['wall_s']}s")
    _idle_wait(comm)  # dist: nobody exits before the index exists
    if world.rank == 0:
        check_rejects(index, out, opts.max_reject_fraction)
    return index


def _idle_wait(comm) -> None:
    """Wait for every rank without busy-polling: a rank that finished early must not take the
    core of one still working (MPI's blocking calls spin; the cores are often oversubscribed)."""
    if comm is None:
        return
    req = comm.Ibarrier()  # dist
    while not req.Test():
        time.sleep(0.01)


def _parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, type=Path, help="JSONL: id, audio, duration, text, speaker")
    p.add_argument("--out", required=True, type=Path, help="output directory for shards + index.json")
    p.add_argument("--config", help="YAML config; only its features section is used")
    p.add_argument("--force", action="store_true", help="recompute, even if up to date or of another manifest")
    p.add_argument("--shard-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20, help="shard size cap (MiB)")
    p.add_argument("--shard-utts", type=int, default=0, help="shard utterance cap (0 = none)")
    p.add_argument("--unit-seconds", type=float, default=600.0, help="audio per work unit")
    p.add_argument("--speed-perturb", default="", help="e.g. 0.9,1.0,1.1: extra copies with ids sp0.9-<id>")
    p.add_argument("--max-reject-fraction", type=float, default=0.01, help="exit 3 above this")
    p.add_argument("--device", default="cpu", help="torch FBANK device, e.g. cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args, rest = p.parse_known_args(argv)
    speeds = tuple(float(s) for s in args.speed_perturb.split(",") if s.strip()) or (1.0,)
    opts = PrepOptions(int(args.shard_mb * 2**20), args.shard_utts, args.unit_seconds, speeds,
                       args.max_reject_fraction, args.device, args.force)
    return args, rest, opts


def main(argv: list[str] | None = None) -> int:
    args, rest, opts = _parse(argv)
    try:
        features = load_config(args.config, rest).features
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.device != "cpu" and features.backend != "torch":
        print(f"error: --device {opts.device} needs features.backend torch", file=sys.stderr)
        return 2
    world = detect_world()
    comm = mpi_comm() if world.size > 1 else None
    if comm is not None:
        world = World(comm.Get_rank(), comm.Get_size(), world.local_rank, world.local_size)
    import torch

    torch.set_num_threads(args.threads)  # ranks are the parallelism; one FBANK thread each is fastest
    try:
        run(args.manifest, args.out, features, world, comm, opts)
    except RejectsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # any failure on any rank must end the whole job
        code = 2 if isinstance(e, (ManifestError, OutDirInUse, FileNotFoundError)) else 1
        msg = str(e) if code == 2 else f"{world.tag} {type(e).__name__}: {' '.join(str(e).split())[:400]}"
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.unraisablehook = lambda _u: None  # h5py handles of a failed write complain as they die
        if comm is not None:
            comm.Abort(code)  # dist: the other ranks would wait forever in gather
        return code
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
