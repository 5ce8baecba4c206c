"""The front door: ``hpc-asr VERB [args]`` (the console script) == ``python -m hpc_asr VERB [args]``.

One verb per stage, each the ``main(argv)`` of the module that owns it; ``hpc-asr VERB --help``
shows that verb's options. Verbs are imported only when called, so ``hpc-asr --help`` and the light
verbs (jobs, prep) never load torch.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["VERBS", "main"]

# verb -> (module, one-line description); a verb with sub-verbs maps to a dict of them.
VERBS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "prep": {
        "fbank": ("data_prep.fbank", "MPI ranks: manifest -> Kaldi FBANK in sharded HDF5 (resumable)"),
        "augment": ("data_prep.augment", "MPI ranks: one augmented copy per utterance (speed, noise, reverb)"),
        "verify": ("data_prep.verify", "check every shard of a prepared split against its index"),
        "librispeech": ("data_prep.recipes.librispeech", "LibriSpeech directory -> manifest"),
        "voice-assistant": ("data_prep.recipes.voice_assistant.synth", "synthesize the voice-assistant corpus"),
        "manifest": ("data_prep.readers", "Kaldi dir / TSV / CSV -> JSONL manifest"),
    },
    "train": ("hpc_asr.train.loop", "train Conformer-CTC, one process per rank (Horovod or torch.distributed)"),
    "lm": {
        "build": ("hpc_asr.decode.ngram", "build a Kneser-Ney ARPA LM from manifests' transcripts"),
        "tune": ("hpc_asr.decode.tune", "tune LM weight and word bonus on dev (writes decode.json)"),
    },
    "evaluate": ("hpc_asr.decode.evaluate", "WER/CER of a checkpoint on a prepared split (greedy, beam, beam+lm)"),
    "export": ("hpc_asr.deploy.export", "ONNX + TorchScript, written only after the parity gate passes"),
    "latency": ("hpc_asr.bench.latency", "p50/p95 latency and RTF of an export, waveform -> text"),
    "serve": ("hpc_asr.deploy.serve", "the recognition service (HTTP + WebSocket) over an export"),
    "export-sherpa": ("hpc_asr.deploy.sherpa", "an export as a sherpa-onnx wenet_ctc model (+ tokens.txt)"),
    "jobs": ("hpc_asr.ops.jobs", "render/submit SLURM or PBS job chains"),
    "doctor": ("hpc_asr.ops.doctor", "check this node/allocation under the training launcher"),
    "stage": ("hpc_asr.ops.stage", "copy shards to node-local scratch, checked (one process per node)"),
    "bench": {
        "micro": ("hpc_asr.bench.micro", "model/feature micro-benchmarks against peers"),
        "train": ("hpc_asr.bench.train", "training step throughput and scaling"),
        "prep": ("hpc_asr.bench.prep", "prep throughput and scaling"),
        "gpu": ("hpc_asr.bench.gpu", "GPU step, torch.compile, FBANK backends"),
        "ablation": ("hpc_asr.bench.ablation", "the augmentation ablation on a reduced corpus"),
        "voices": ("hpc_asr.bench.voices", "the training-engine ablation (festival held out) on a reduced corpus"),
        "peer": ("hpc_asr.bench.peer", "the PocketSphinx peer on a manifest"),
        "streaming": ("hpc_asr.bench.streaming", "offline vs streaming WER and stream latency of a checkpoint"),
        "serve": ("hpc_asr.bench.serve", "load-test the service (1/4/16 clients, hostile mix) vs sherpa-onnx"),
    },
    "report": ("hpc_asr.bench.report", "the demo run's report.json, summary and plots"),
    "checkpoint": ("hpc_asr.checkpoint", "inspect or average checkpoints"),
}
DEFAULT_SUB = {"lm": "build"}  # `hpc-asr lm --manifest ...` builds, as `python -m hpc_asr.lm` did


def _usage(prog: str, table: dict) -> str:
    width = max(len(v) for spec in (table, *(s for s in table.values() if isinstance(s, dict))) for v in spec) + 4
    lines = [f"usage: {prog} VERB [options]   ({prog} VERB --help for a verb's options)", "", "verbs:"]
    for verb, spec in table.items():
        if isinstance(spec, dict):
            lines.append(f"  {verb:<{width}}{' | '.join(spec)}")
            lines += [f"    {sub:<{width - 2}}{desc}" for sub, (_, desc) in spec.items()]
        else:
            lines.append(f"  {verb:<{width}}{spec[1]}")
    lines += ["", "Config overrides (train, evaluate, jobs): --section.key value, e.g. --train.epochs 3"]
    return "\n".join(lines)


def run(module: str, argv: list[str], prog: str) -> int:
    """Call ``module.main(argv)`` with ``prog`` as the program name its argparse prints."""
    mod = importlib.import_module(module)
    sys.argv[0] = prog
    rc = mod.main(argv)
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog, table = "hpc-asr", VERBS
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(prog, table))
            return 0 if argv else 2
        verb, argv = argv[0], argv[1:]
        spec = table.get(verb)
        if spec is None:
            if prog.split()[-1] in DEFAULT_SUB:  # `lm --manifest ...`: the default sub-verb
                sub = DEFAULT_SUB[prog.split()[-1]]
                return run(table[sub][0], [verb, *argv], f"{prog} {sub}")
            print(f"{prog}: unknown verb {verb!r}; one of: {', '.join(table)}", file=sys.stderr)
            return 2
        prog = f"{prog} {verb}"
        if isinstance(spec, dict):
            table = spec
            continue
        return run(spec[0], argv, prog)


if __name__ == "__main__":
    sys.exit(main())
