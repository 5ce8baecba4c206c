"""Collect a run's stage outputs into ``report.json``, a loss-curve PNG and a short summary.

    python -m hpc_asr report --run runs/demo [--data data/va] [--bar-wer 0.10]

Reads ``train_summary.json`` (train), ``eval.json`` (evaluate, the reported decoder),
``export/export.json`` (export) and ``latency.json`` (latency) from the run directory, and when
present the other evaluations: ``eval_greedy.json`` (same test split, greedy decoding),
``eval_festival.json`` (the festival cross-synthesizer split) and ``eval_real.json`` (the real
LibriSpeech fixture utterances); a missing one is reported as ``null`` / "not run". The exit code
is 1 when test WER is above ``--bar-wer`` or ONNX transcripts differ, so ``make demo`` fails loudly.

With ``--data`` (the corpus directory: ``train.jsonl``, ``test.jsonl``) the report splits the test
by the synthesizer that spoke each utterance (the manifests' ``engine``): ``wer_by_engine`` (and
the peer's), ``train_engines``; when the test holds several engines ``wer``/``wer_greedy`` are the
espeak-ng part (held-out espeak voices and sentences, as before the corpus had other engines) and
``wer_all_engines`` is the whole split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpc_asr.atomic import atomic_path, write_json_atomic
from hpc_asr.data.manifest import read_manifest
from hpc_asr.decode.wer import error_counts, rates

__all__ = ["build_report", "plot_curves"]


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (did the stage that writes it run?)")
    return json.loads(path.read_text())


def _optional(path: Path) -> dict | None:
    return _read(path) if path.is_file() else None


def _rate(ev: dict | None, key: str = "wer") -> float | None:
    return None if ev is None else round(ev[key], 4)


def by_engine(rows: list[tuple[str, str, str]], engine_of: dict[str, str], cer: bool = False) -> dict[str, float]:
    """WER (or CER) per synthesizer of (utterance id, reference, hypothesis) rows."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for uid, ref, hyp in rows:
        refs, hyps = groups.setdefault(engine_of.get(uid) or "recorded", ([], []))
        refs.append(ref)
        hyps.append(hyp)
    return {e: round(rates(error_counts(r, h))[int(cer)], 4) for e, (r, h) in sorted(groups.items())}


def _hyp_rows(ev: dict | None) -> list[tuple[str, str, str]]:
    """(id, ref, hyp) of an evaluate or peer result (evaluate: a dict by id; peer: a list)."""
    if ev is None or "hypotheses" not in ev:
        return []
    h = ev["hypotheses"]
    if isinstance(h, dict):
        return [(i, x["ref"], x["hyp"]) for i, x in h.items()]
    return [(x["id"], x["ref"], x["hyp"]) for x in h]


def _engines(run: Path, data: Path, report: dict, ev: dict, greedy: dict | None) -> dict:
    """The per-engine keys (see the module docstring); ``ev``/``greedy``: the test evaluations."""
    train = read_manifest(data / "train.jsonl")
    engine_of = {u.id: u.engine for u in read_manifest(data / "test.jsonl")}
    hours: dict[str, float] = {}
    for u in train:
        hours[u.engine or "recorded"] = hours.get(u.engine or "recorded", 0.0) + u.duration / 3600
    out = {"train_engines": sorted(hours), "train_hours_by_engine": {e: round(h, 3) for e, h in sorted(hours.items())},
           "wer_by_engine": by_engine(_hyp_rows(ev), engine_of),
           "wer_greedy_by_engine": by_engine(_hyp_rows(greedy), engine_of) if greedy else None,
           "peer_wer_by_engine": by_engine(_hyp_rows(_optional(run / "peer_test.json")), engine_of) or None}
    if len(out["wer_by_engine"]) > 1 and "espeak" in out["wer_by_engine"]:
        espeak_cer = by_engine(_hyp_rows(ev), engine_of, cer=True)["espeak"]
        out.update(wer_all_engines=report["wer"], cer_all_engines=report["cer"], wer=out["wer_by_engine"]["espeak"],
                   cer=espeak_cer, test_utterances=sum(e == "espeak" for e in engine_of.values()),
                   test_scope="espeak-ng utterances of the test split (wer_by_engine: every engine)")
        if out["wer_greedy_by_engine"]:
            out["wer_greedy"] = out["wer_greedy_by_engine"]["espeak"]
            out["cer_greedy"] = by_engine(_hyp_rows(greedy), engine_of, cer=True)["espeak"]
        if out["peer_wer_by_engine"]:
            out["peer_wer"] = out["peer_wer_by_engine"].get("espeak")
    return out


def build_report(run: Path, data: Path | None = None) -> dict:
    train = _read(run / "train_summary.json")
    ev = _read(run / "eval.json")
    ex = _read(run / "export" / "export.json")
    lat = _read(run / "latency.json")
    greedy, fest, real = (_optional(run / f"eval_{k}.json") for k in ("greedy", "festival", "real"))
    if greedy is None and ev.get("decoder", "greedy") == "greedy":
        greedy = ev
    report = {
        "wer": round(ev["wer"], 4),
        "cer": round(ev["cer"], 4),
        "decoder": ev.get("decoder", "greedy"),
        "lm_weight": ev.get("lm_weight"),
        "word_score": ev.get("word_score"),
        "wer_greedy": _rate(greedy),
        "cer_greedy": _rate(greedy, "cer"),
        "wer_festival": _rate(fest),
        "cer_festival": _rate(fest, "cer"),
        "festival_decoder": None if fest is None else fest.get("decoder", "greedy"),
        "festival_utterances": None if fest is None else fest["utterances"],
        "real_fixture_wer": _rate(real),
        "real_fixture_cer": _rate(real, "cer"),
        "real_fixture_decoder": None if real is None else real.get("decoder", "greedy"),
        "real_fixture_utterances": None if real is None else real["utterances"],
        "test_substitutions": ev.get("substitutions"),
        "test_deletions": ev.get("deletions"),
        "test_insertions": ev.get("insertions"),
        "test_frequent_errors": ev.get("frequent_errors", [])[:10],
        "test_utterances": ev["utterances"],
        "train_hours": train["train_hours"],
        "train_wall_s": train["train_wall_s"],
        "train_steps": train["steps"],
        "params": train["params"],
        "ranks": train["ranks"],
        "engine": train["engine"],
        "compression": train["compression"],
        "replicas_identical": train.get("replicas_identical"),
        "onnx_max_abs_diff": ex["onnx_max_abs_diff"],
        "onnx_transcripts_match": ex["onnx_transcripts_match"],
        "torchscript_max_abs_diff": ex["torchscript_max_abs_diff"],
        "parity_utterances": ex["utterances"],
        "latency_ms_p50": lat["latency_ms_p50"],
        "latency_ms_p95": lat["latency_ms_p95"],
        "rtf": lat["rtf"],
        "latency_threads": lat["threads"],
        **_peer(run),
        "dev_curve": [{k: d[k] for k in ("epoch", "step", "loss", "wer", "cer")} for d in train["dev"]],
    }
    if data is not None:
        report.update(_engines(run, data, report, ev, greedy))
    report["beats_peer_on"] = beaten(report) if report["peer"] else None
    return report


def _peer(run: Path) -> dict:
    """The peer recognizer (hpc_asr.bench.peer) on the same splits, where the demo ran it."""
    peer = {k: _optional(run / f"peer_{k}.json") for k in ("test", "festival", "real")}
    done = [p for p in peer.values() if p is not None]
    return {"peer": done[0]["peer"] if done else None,
            "peer_wer": _rate(peer["test"]), "peer_wer_festival": _rate(peer["festival"]),
            "peer_real_fixture_wer": _rate(peer["real"]),
            "peer_rtf": max((p["rtf"] for p in done if p["rtf"] is not None), default=None)}


def plot_curves(train_summary: dict, path: Path) -> None:
    """Training loss per logged step and dev WER per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, dev = train_summary["history"], train_summary["dev"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([h["step"] for h in hist], [h["loss"] for h in hist], label="train")
    a.plot([d["step"] for d in dev], [d["loss"] for d in dev], "o-", label="dev")
    a.set_xlabel("optimizer step")
    a.set_ylabel("CTC loss per utterance")
    a.set_yscale("log")
    a.legend()
    a.grid(alpha=0.3)
    b.plot([d["step"] for d in dev], [100 * d["wer"] for d in dev], "o-", label="dev WER")
    b.plot([d["step"] for d in dev], [100 * d["cer"] for d in dev], "s--", label="dev CER")
    b.set_xlabel("optimizer step")
    b.set_ylabel("%")
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(f"{train_summary['engine']} x{train_summary['ranks']} ranks, "
                 f"{train_summary['train_hours']:.2f} h, {train_summary['train_wall_s']:.0f} s")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "not run" if x is None else f"{x:.2%}"


def _wer_lines(r: dict) -> str:
    """Greedy and the reported decoder side by side, then the unseen-engine and real speech."""
    lm = f" (LM weight {r['lm_weight']}, word bonus {r['word_score']})" if r["lm_weight"] is not None else ""
    rows = [f"            WER {r['wer']:.2%}   CER {r['cer']:.2%}   {r['decoder']}{lm}"]
    if r["decoder"] != "greedy":
        rows.append(f"            WER {_pct(r['wer_greedy'])}   CER {_pct(r['cer_greedy'])}   greedy")
    if r.get("wer_by_engine"):
        rows.append("            by engine (" + r["decoder"] + "): " + ", ".join(
            f"{e} {_pct(w)}" for e, w in r["wer_by_engine"].items()) + f"; trained on {', '.join(r['train_engines'])}")
    rows.append(f"  festival  WER {_pct(r['wer_festival'])}   {r['festival_utterances'] or 0} utterances of an "
                f"engine never heard in training ({r['festival_decoder']})")
    rows.append(f"  real      WER {_pct(r['real_fixture_wer'])}   {r['real_fixture_utterances'] or 0} LibriSpeech "
                f"fixture utterances ({r['real_fixture_decoder']})")
    if r.get("peer"):
        rows.append(f"  peer      WER {_pct(r['peer_wer'])} test, {_pct(r['peer_wer_festival'])} festival, "
                    f"{_pct(r['peer_real_fixture_wer'])} real, RTF {r['peer_rtf']}: {r['peer']}")
        rows.append(f"            we beat it on: {', '.join(r['beats_peer_on']) or 'nothing'}")
    return "\n".join(rows)


def beaten(r: dict) -> list[str]:
    """Where our number is better than the peer's on the same utterances (lower is better)."""
    pairs = {"test": ("wer", "peer_wer"), "festival": ("wer_festival", "peer_wer_festival"),
             "real": ("real_fixture_wer", "peer_real_fixture_wer"), "speed": ("rtf", "peer_rtf")}
    return [name for name, (ours, peer) in pairs.items()
            if r.get(ours) is not None and r.get(peer) is not None and r[ours] < r[peer]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--data", type=Path, default=None,
                   help="the corpus directory (train.jsonl, test.jsonl): per-engine WER and training engines")
    p.add_argument("--bar-wer", type=float, default=0.10,
                   help="fail (exit 1) when test WER (the reported decoder) is above this fraction")
    args = p.parse_args(argv)
    try:
        report = build_report(args.run, args.data)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(args.run / "report.json", report)
    plot_curves(_read(args.run / "train_summary.json"), args.run / "loss_curve.png")
    r = report
    scope = "espeak-ng " if r.get("test_scope") else ""
    print(f"""
hpc_asr demo — {args.run}/report.json
  trained   {r['train_hours']:.2f} h of audio, {r['params'] / 1e6:.2f}M params, {r['train_steps']} steps,
            {r['train_wall_s']:.0f} s on {r['ranks']} ranks ({r['engine']}, {r['compression']} allreduce)
  test      {r['test_utterances']} {scope}utterances, held-out voices and sentences:
{_wer_lines(r)}
  export    ONNX max |Δlog-prob| {r['onnx_max_abs_diff']:.1e}, transcripts identical: {r['onnx_transcripts_match']}
  latency   p50 {r['latency_ms_p50']} ms, p95 {r['latency_ms_p95']} ms, RTF {r['rtf']} \
({r['latency_threads']} CPU thread)
  plot      {args.run}/loss_curve.png
""")
    failures = []
    if args.bar_wer is not None and r["wer"] > args.bar_wer:
        failures.append(f"test WER {r['wer']:.2%} ({r['decoder']}) is above the bar {args.bar_wer:.0%}")
    if not r["onnx_transcripts_match"]:
        failures.append("ONNX transcripts differ from PyTorch")
    if r["replicas_identical"] is False:
        failures.append("training replicas differ at the end of training (train_summary.json: replicas)")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
