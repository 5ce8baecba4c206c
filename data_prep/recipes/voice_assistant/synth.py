"""Synthesize a voice-assistant speech corpus with espeak-ng (and a festival test split) and
write JSONL manifests.

Usage::

    python -m hpc_asr prep voice-assistant --out data/va --hours 3.0 --seed 0 [--jobs N] [--force]
    mpirun -np 4 python -m hpc_asr prep voice-assistant --out data/va --hours 3.0   # split across ranks

Layout under OUT::

    wav/<split>/<id>.wav        16 kHz, mono, 16-bit PCM
    train.jsonl dev.jsonl test.jsonl test_festival.jsonl
    corpus.json                 summary (hours/utterances/speakers per split, vocabulary, args)

Manifest lines are JSON objects ``{"id", "audio", "duration", "text", "speaker"}``.
``audio`` is a path **relative to the directory holding the manifest** (e.g.
``wav/train/train_000001.wav``), so a corpus can be moved or copied as one folder.
``duration`` is in seconds, ``text`` uses only ``[a-z' ]`` and ``speaker`` is
``"<accent>+<variant>"`` (an espeak-ng voice plus a voice variant) or ``"festival+<voice>"``.

Cross-synthesizer split: ``test_festival`` holds further held-out sentences spoken by Debian's
``festival`` (diphone and HTS voices: another synthesis engine and other voices). Only espeak-ng
ever speaks training audio, so this split measures what a model does on an engine it never heard
(``--festival-utts 0`` leaves it out).

Held-out splits: dev and test use speakers (accent+variant pairs) never seen in training and
sentences never seen in training.  Whole accents or variants are never held out, only
combinations, so a test speaker is a new mix of an accent and a variant that each appear in
training (see `split_speakers`).

Speed matters because this is the first stage of ``make demo``: espeak-ng processes run in a
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
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.recipes.voice_assistant import grammar
from hpc_asr.atomic import atomic_path
from hpc_asr.dist.launch import detect_world

FORMAT_VERSION = 2  # 2: wider voices/ranges, word gaps, test_festival
SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test", "test_festival")

# Every English espeak-ng voice (accent).  MBROLA voices (en-uk, us-mbrola-*, en-german-*...)
# are left out: they need extra packages and ignore variants.  Missing ones are dropped at run
# time.
ACCENTS = ("en-us", "en-us-nyc", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-029")
# Every espeak-ng voice variant (file names) except those that stop sounding like speech:
# whisper, croak, the robots (robosoft*, UniRobot, anikaRobot), Demonic, the announcer echo,
# the RicishayMax/Tweaky squeaks and fast_test.  The six Klatt synthesizer variants are in.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
            "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "antonio", "aunty",
            "belinda", "benjamin", "boris", "caleb", "david", "Denis", "Diogo", "ed", "edward",
            "edward2", "Gene", "Gene2", "grandma", "grandpa", "gustave", "Henrique", "Hugo", "iven",
            "iven2", "iven3", "iven4", "Jacky", "john", "kaukovalta", "Lee", "linda", "marcelo",
            "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "Mr", "Nguyen", "norbert",
            "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph",
            "steph2", "steph3", "Storm", "travis", "victor", "zac", "anika")
SPEED_RANGE = (115, 235)      # words per minute (espeak-ng -s)
PITCH_RANGE = (10, 90)        # espeak-ng -p, 0..99
WORD_GAP_RANGE = (0, 6)       # espeak-ng -g: extra pause between words, units of 10 ms
# festival voices for the cross-synthesizer test (Debian festvox-kallpc16k, festvox-kdlpc16k,
# festvox-us-slt-hts); those not installed are skipped, none at all is an error.
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
STRETCH_RANGE = (0.85, 1.2)   # festival Duration_Stretch (diphone voices)
FESTIVAL_BATCH = 25           # utterances per festival process (start-up costs ~0.3 s)
LEAD_SILENCE = (0.05, 0.25)   # seconds of padding before / after speech (after trimming espeak's own)
TRAIL_SILENCE = (0.05, 0.30)
PEAK_RANGE = (0.25, 0.90)     # output peak level, so loudness varies between utterances
NOISE_PROB = 0.6              # share of utterances that get white noise ...
SNR_RANGE_DB = (25.0, 45.0)   # ... at this signal-to-noise ratio
HELDOUT_FRAC = 0.10           # share of accent+variant pairs for dev, and again for test
# Seconds of speech per (character / wpm); calibrated on this grammar with espeak-ng 1.51.
SECONDS_PER_CHAR_WPM = 8.9
ESPEAK_OVERHEAD_S = 0.11     # what is left of espeak-ng's own silence after trim_silence()
ESPEAK_TIMEOUT_S = 60


class CliError(Exception):
    """An error reported as one line on stderr with exit status 2."""


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


# ---------------------------------------------------------------------------------------
# Voices and splits
# ---------------------------------------------------------------------------------------

def _espeak_list(kind: str) -> str:
    res = subprocess.run(["espeak-ng", f"--voices={kind}"], capture_output=True, text=True,
                         check=False, timeout=ESPEAK_TIMEOUT_S)
    if res.returncode != 0:
        raise CliError(f"espeak-ng --voices={kind} failed: {res.stderr.strip()}")
    return res.stdout


def available_voices() -> tuple[list[str], list[str]]:
    """ACCENTS and VARIANTS that this espeak-ng installation actually has."""
    accent_rows = [line.split() for line in _espeak_list("en").splitlines()[1:]]
    langs = {row[1] for row in accent_rows if len(row) > 4 and not row[4].startswith("mb/")}
    files = {row[-1].split("/")[-1].lower() for row in
             (line.split() for line in _espeak_list("variant").splitlines()[1:]) if row}
    accents = [a for a in ACCENTS if a in langs]
    variants = [v for v in VARIANTS if v.lower() in files]
    if not accents or not variants:
        raise CliError("espeak-ng has no usable English voices or variants")
    return accents, variants


def split_speakers(accents: list[str], variants: list[str], seed: int,
                   frac: float = HELDOUT_FRAC) -> dict[str, list[str]]:
    """Assign each accent+variant pair to train, dev or test.

    Pairs are visited in a seeded order and held out only while training keeps at least
    half (and at least one) of the pairs of that accent and of that variant, so dev/test
    voices are new combinations of familiar parts.  Returns speaker ids per split.
    """
    pairs = [(a, v) for a in accents for v in variants]
    random.Random(f"speakers-{seed}").shuffle(pairs)
    n_held = max(1, round(frac * len(pairs)))
    left_a = {a: len(variants) for a in accents}     # train pairs per accent
    left_v = {v: len(accents) for v in variants}     # train pairs per variant
    min_a = max(1, math.ceil(len(variants) / 2))
    min_v = max(1, math.ceil(len(accents) / 2))
    held: dict[str, list[str]] = {"dev": [], "test": []}
    train: list[str] = []
    for a, v in pairs:
        split = next((s for s in ("dev", "test") if len(held[s]) < n_held), None)
        if split and left_a[a] > min_a and left_v[v] > min_v:
            held[split].append(f"{a}+{v}")
            left_a[a] -= 1
            left_v[v] -= 1
        else:
            train.append(f"{a}+{v}")
    if not held["dev"] or not held["test"]:
        raise CliError(f"too few voices to hold out speakers: {len(pairs)} pairs")
    return {"train": sorted(train), "dev": sorted(held["dev"]), "test": sorted(held["test"])}


# ---------------------------------------------------------------------------------------
# Planning: every rank builds the identical list from the seed
# ---------------------------------------------------------------------------------------

@dataclass
class Utt:
    """Everything needed to render one utterance, fixed before any audio is made."""
    index: int
    id: str
    split: str
    text: str
    speaker: str
    speed: int
    pitch: int
    gap: int
    lead: float
    trail: float
    peak: float
    snr_db: float | None


def estimate_seconds(text: str, speed: int, lead: float = 0.0, trail: float = 0.0, gap: int = 0) -> float:
    """Rough audio length, used only to pick how many training sentences reach --hours."""
    words_gap = 0.01 * gap * text.count(" ")
    return SECONDS_PER_CHAR_WPM * len(text) / speed + ESPEAK_OVERHEAD_S + lead + trail + words_gap


def _make_utt(index: int, split: str, n: int, text: str, speaker: str,
              rng: random.Random) -> Utt:
    return Utt(index=index, id=f"{split}_{n:06d}", split=split, text=text, speaker=speaker,
               speed=rng.randint(*SPEED_RANGE), pitch=rng.randint(*PITCH_RANGE),
               gap=rng.randint(*WORD_GAP_RANGE), lead=round(rng.uniform(*LEAD_SILENCE), 3),
               trail=round(rng.uniform(*TRAIL_SILENCE), 3),
               peak=round(rng.uniform(*PEAK_RANGE), 3),
               snr_db=round(rng.uniform(*SNR_RANGE_DB), 1) if rng.random() < NOISE_PROB
               else None)


def _speaker_cycle(speakers: list[str], rng: random.Random):
    """Round-robin over speakers in fresh shuffles, so every speaker gets a fair share."""
    while True:
        order = list(speakers)
        rng.shuffle(order)
        yield from order


def plan_corpus(speakers: dict[str, list[str]], hours: float, dev_utts: int, test_utts: int,
                seed: int, festival_utts: int = 0) -> list[Utt]:
    """Texts and voice settings for all utterances; dev/test/test_festival texts never occur in
    train. ``speakers["test_festival"]`` holds ``festival+<voice>`` ids."""
    text_rng = random.Random(f"text-{seed}")
    voice_rng = random.Random(f"voice-{seed}")
    stream = grammar.sentence_stream(text_rng)
    utts: list[Utt] = []
    heldout_texts: set[str] = set()
    for split, count in (("dev", dev_utts), ("test", test_utts), ("test_festival", festival_utts)):
        cycle = _speaker_cycle(speakers.get(split, []), voice_rng) if count else None
        for n in range(1, count + 1):
            text = next(stream)
            heldout_texts.add(text)
            utts.append(_make_utt(len(utts), split, n, text, next(cycle), voice_rng))
    cycle = _speaker_cycle(speakers["train"], voice_rng)
    budget, n = hours * 3600.0, 0
    while budget > 0:
        text = next(stream)
        if text in heldout_texts:   # only possible if the grammar ran out of new sentences
            continue
        n += 1
        utt = _make_utt(len(utts), "train", n, text, next(cycle), voice_rng)
        utts.append(utt)
        budget -= estimate_seconds(text, utt.speed, utt.lead, utt.trail, utt.gap)
    return utts


# ---------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------

def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode 16-bit PCM WAV bytes as written by ``espeak-ng --stdout``.

    espeak-ng streams, so its RIFF/data sizes are placeholders (0x7fffffff); the data chunk
    is taken to run to the end of the bytes instead of trusting its size.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV stream")
    pos, rate, bits, channels = 12, None, None, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if tag == b"fmt ":
            channels = int.from_bytes(data[body + 2:body + 4], "little")
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            bits = int.from_bytes(data[body + 14:body + 16], "little")
        elif tag == b"data":
            if rate is None or bits != 16:
                raise ValueError(f"unsupported WAV format (bits={bits})")
            pcm = data[body:]
            pcm = pcm[:len(pcm) - len(pcm) % (2 * channels)]
            x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            return x.reshape(-1, channels).mean(axis=1), rate
        pos = body + size + (size & 1)
    raise ValueError("WAV stream has no data chunk")


def _next_smooth(n: int) -> int:
    """Smallest m >= n with only factors 2, 3, 5, so the FFTs below stay fast."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited FFT resampling (no scipy needed).

    The input is zero-padded to a whole number of sr_in/gcd blocks so the rate change is
    exact; the top 10% of the kept band gets a raised-cosine taper instead of a brick wall
    to limit ringing.  espeak-ng output starts and ends near silence, so the FFT's circular
    wrap-around is harmless.
    """
    if sr_in == sr_out or len(x) == 0:
        return x.astype(np.float32)
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    blocks = _next_smooth(-(-len(x) // down))
    n_in, n_out = blocks * down, blocks * up
    spec = np.fft.rfft(x, n_in)
    keep = min(len(spec), n_out // 2 + 1)
    out_spec = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    out_spec[:keep] = spec[:keep]
    taper_start = int(0.9 * keep)
    ramp = 0.5 * (1 + np.cos(np.linspace(0, np.pi, keep - taper_start)))
    out_spec[taper_start:keep] *= ramp
    y = np.fft.irfft(out_spec, n_out) * (n_out / n_in)
    return y[:round(len(x) * up / down)].astype(np.float32)


def trim_silence(x: np.ndarray, keep_s: float = 0.03) -> np.ndarray:
    """Cut espeak-ng's own leading/trailing silence (about 0.25 s + 0.6 s, a third of a short
    command) so the padding below is the only silence, and training spends no compute on it."""
    env = np.convolve(x * x, np.ones(160, np.float32) / 160, mode="same")
    loud = np.flatnonzero(env > max(float(env.max()) * 1e-4, 1e-9))
    if loud.size == 0:
        return x
    keep = int(keep_s * SAMPLE_RATE)
    return x[max(loud[0] - keep, 0): loud[-1] + keep + 1]


def postprocess(x: np.ndarray, utt: Utt, seed: int) -> np.ndarray:
    """Pad with silence, set the peak level and maybe add noise, deterministically per utt."""
    peak = float(np.max(np.abs(x)))
    x = x * (utt.peak / peak)
    lead, trail = int(utt.lead * SAMPLE_RATE), int(utt.trail * SAMPLE_RATE)
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(trail, np.float32)])
    if utt.snr_db is not None:
        rng = np.random.default_rng([seed, utt.index])
        speech_rms = float(np.sqrt(np.mean(x[lead:len(x) - trail] ** 2)))
        noise_rms = speech_rms / (10 ** (utt.snr_db / 20))
        x = x + rng.standard_normal(len(x)).astype(np.float32) * noise_rms
    return np.clip(x, -1.0, 1.0)


def write_wav(path: Path, x: np.ndarray) -> None:
    """16 kHz mono 16-bit PCM via the standard library."""
    pcm = np.round(x * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def espeak_command(utt: Utt) -> list[str]:
    accent, variant = utt.speaker.split("+", 1)
    return ["espeak-ng", "-v", f"{accent}+{variant}", "-s", str(utt.speed),
            "-p", str(utt.pitch), "-g", str(utt.gap), "--stdout", utt.text]


def _finish(utt: Utt, wav: bytes, out: Path, seed: int) -> dict:
    """Synthesizer WAV bytes → trimmed, padded, levelled 16 kHz file and its manifest row, or
    {"id", "error"} instead of raising."""
    try:
        x, rate = parse_wav(wav)
        x = resample(x, rate, SAMPLE_RATE)
        if len(x) < SAMPLE_RATE // 20 or float(np.max(np.abs(x), initial=0.0)) < 1e-4:
            raise RuntimeError("empty audio")
        x = postprocess(trim_silence(x), utt, seed)
        rel = Path("wav") / utt.split / f"{utt.id}.wav"
        write_wav(out / rel, x)
    except Exception as exc:
        return {"id": utt.id, "split": utt.split, "error": f"{type(exc).__name__}: {exc}"}
    return {"id": utt.id, "split": utt.split, "audio": rel.as_posix(),
            "duration": round(len(x) / SAMPLE_RATE, 4), "text": utt.text,
            "speaker": utt.speaker}


def synthesize(utt: Utt, out: Path, seed: int) -> dict:
    """Render one utterance with espeak-ng; returns a manifest row or {"id", "error"}."""
    try:
        res = subprocess.run(espeak_command(utt), capture_output=True, check=False,
                             stdin=subprocess.DEVNULL, timeout=ESPEAK_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"espeak-ng exit {res.returncode}: "
                               f"{res.stderr.decode(errors='replace').strip()[:200]}")
    except Exception as exc:
        return {"id": utt.id, "split": utt.split, "error": f"{type(exc).__name__}: {exc}"}
    return _finish(utt, res.stdout, out, seed)


def festival_script(utts: list[Utt], wav_dir: Path) -> str:
    """A festival (Scheme) batch script rendering ``utts`` to ``wav_dir/<id>.wav``; the espeak
    speed drawn for each utterance becomes a duration stretch (diphone voices honour it)."""
    lines = []
    for u in utts:
        stretch = min(max(165 / u.speed, STRETCH_RANGE[0]), STRETCH_RANGE[1])
        lines += [f"(voice_{u.speaker.split('+', 1)[1]})",
                  f"(Parameter.set 'Duration_Stretch {stretch:.3f})",
                  f'(utt.save.wave (utt.synth (Utterance Text "{u.text}")) "{wav_dir / u.id}.wav" \'riff)']
    return "\n".join(lines) + "\n"


def synthesize_festival(utts: list[Utt], out: Path, seed: int) -> list[dict]:
    """Render a batch with one festival process; rows as `synthesize` returns them."""
    with tempfile.TemporaryDirectory(prefix="festival-") as tmp:
        script = Path(tmp) / "batch.scm"
        script.write_text(festival_script(utts, Path(tmp)))
        try:
            res = subprocess.run(["festival", "-b", str(script)], capture_output=True, check=False,
                                 stdin=subprocess.DEVNULL, timeout=ESPEAK_TIMEOUT_S * 5)
            problem = res.stderr.decode(errors="replace").strip()[:200] if res.returncode else ""
        except subprocess.TimeoutExpired:
            problem = "festival timed out"
        rows = []
        for u in utts:
            wav = Path(tmp) / f"{u.id}.wav"
            rows.append(_finish(u, wav.read_bytes(), out, seed) if wav.is_file() else
                        {"id": u.id, "split": u.split, "error": f"festival wrote no audio {problem}".strip()})
        return rows


def festival_voices() -> list[str]:
    """FESTIVAL_VOICES that this festival installation has."""
    if shutil.which("festival") is None:
        raise CliError("festival not found on PATH for the test_festival split (apt-get install festival "
                       "festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts), or pass --festival-utts 0")
    res = subprocess.run(["festival", "-b", "(begin (print (voice.list)))"], capture_output=True, text=True,
                         check=False, timeout=ESPEAK_TIMEOUT_S)
    have = set(res.stdout.replace("(", " ").replace(")", " ").split())
    voices = [v for v in FESTIVAL_VOICES if v in have]
    if not voices:
        raise CliError(f"festival has none of the voices {FESTIVAL_VOICES} (apt-get install festvox-kallpc16k)")
    return voices


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
    """Run espeak-ng (one process per utterance) and festival (one per batch) for `utts` on a
    thread pool (the work is in the subprocesses)."""
    fest = [u for u in utts if u.speaker.startswith("festival+")]
    tasks: list = [[u] for u in utts if not u.speaker.startswith("festival+")]
    tasks += [fest[i:i + FESTIVAL_BATCH] for i in range(0, len(fest), FESTIVAL_BATCH)]

    def render(task: list[Utt]) -> list[dict]:
        if task[0].speaker.startswith("festival+"):
            return synthesize_festival(task, out, seed)
        return [synthesize(task[0], out, seed)]

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
    """One JSONL per split, in id order; returns the rows grouped by split."""
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in sorted(rows, key=lambda r: r["id"]):
        by_split[row["split"]].append(
            {k: row[k] for k in ("id", "audio", "duration", "text", "speaker")})
    for split, split_rows in by_split.items():
        _write_atomic(out / f"{split}.jsonl",
                      "".join(json.dumps(r) + "\n" for r in split_rows))
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
                       "vocabulary": len(grammar.vocabulary([r["text"] for r in rows]))}
                   for s, rows in by_split.items()},
        "vocabulary_size": len(grammar.vocabulary(texts)),
        "voices": voices,
        "failed": [{"id": f["id"], "error": f["error"]} for f in failed],
        "manifest_audio_paths": "relative to the manifest's directory",
        "sample_rate": SAMPLE_RATE,
        "elapsed_s": round(elapsed, 1),
    }


def is_up_to_date(out: Path, key: dict) -> bool:
    """True if OUT holds a finished corpus made with the same arguments."""
    try:
        summary = json.loads((out / "corpus.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("args") == key and all((out / f"{s}.jsonl").is_file() for s in SPLITS)


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
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel espeak-ng processes per rank (default: cores / local ranks)")
    p.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = p.parse_args(argv)
    if min(args.hours, args.dev_utts, args.test_utts, args.festival_utts) < 0:
        p.error("--hours, --dev-utts, --test-utts and --festival-utts must be >= 0")
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be >= 1")
    return args


def run(args: argparse.Namespace, rank: int, size: int, local_size: int, comm: Comm) -> int:
    start = time.monotonic()
    out: Path = args.out.resolve()
    key = {"hours": args.hours, "seed": args.seed, "dev_utts": args.dev_utts,
           "test_utts": args.test_utts, "festival_utts": args.festival_utts, "format_version": FORMAT_VERSION}
    if not args.force and is_up_to_date(out, key):
        if rank == 0:
            print("corpus up to date", file=sys.stderr)
        return 0
    if shutil.which("espeak-ng") is None:
        raise CliError("espeak-ng not found on PATH (apt-get install espeak-ng)")
    accents, variants = available_voices()
    speakers = split_speakers(accents, variants, args.seed)
    fest_voices = festival_voices() if args.festival_utts else []
    speakers["test_festival"] = [f"festival+{v}" for v in fest_voices]
    utts = plan_corpus(speakers, args.hours, args.dev_utts, args.test_utts, args.seed, args.festival_utts)
    problem = None
    if rank == 0:
        try:
            clear_outputs(out)
        except OSError as exc:
            problem = f"cannot write to {out}: {exc}"
    problem = comm.bcast(problem)   # doubles as the barrier before anyone writes audio
    if problem:
        raise CliError(problem)

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
    voices = {"accents": accents, "variants": variants, "speakers": speakers}
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
    except CliError as exc:
        if rank == 0:
            print(f"synth: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        comm.abort(1)   # do not leave other ranks waiting in a collective
        raise


if __name__ == "__main__":
    sys.exit(main())
