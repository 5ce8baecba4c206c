"""report.py: stage outputs → report.json, the WER bar, the plot, and a missing stage named."""

import json

import pytest

from hpc_asr.bench import report


def _stage_files(run, wer=0.05, match=True, extra=True):
    (run / "export").mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps({
        "train_hours": 3.0, "train_wall_s": 100.0, "steps": 10, "params": 1000, "ranks": 2,
        "engine": "horovod", "compression": "fp16",
        "history": [{"step": 5, "loss": 50.0}, {"step": 10, "loss": 5.0}],
        "dev": [{"epoch": 0, "step": 10, "loss": 6.0, "wer": 0.2, "cer": 0.05}]}))
    (run / "eval.json").write_text(json.dumps({
        "wer": wer, "cer": 0.03, "utterances": 200, "decoder": "beam+lm", "lm_weight": 0.5, "word_score": 1.0,
        "substitutions": 5, "deletions": 2, "insertions": 1, "frequent_errors": [{"ref": "a", "hyp": "", "count": 2}]}))
    if extra:
        for name, w, n in (("greedy", 0.09, 200), ("festival", 0.25, 200), ("real", 1.017, 4)):
            (run / f"eval_{name}.json").write_text(json.dumps({"wer": w, "cer": w / 3, "utterances": n,
                                                                "decoder": "greedy"}))
    (run / "export" / "export.json").write_text(json.dumps({
        "onnx_max_abs_diff": 1e-5, "onnx_transcripts_match": match, "torchscript_max_abs_diff": 0.0,
        "utterances": 200}))
    (run / "latency.json").write_text(json.dumps({"latency_ms_p50": 10.0, "latency_ms_p95": 20.0,
                                                  "rtf": 0.01, "threads": 1}))


REQUIRED = ["wer", "wer_greedy", "wer_festival", "real_fixture_wer", "decoder",
            "cer", "test_utterances", "train_hours", "train_wall_s", "ranks", "engine", "compression",
            "onnx_max_abs_diff", "onnx_transcripts_match", "latency_ms_p50", "latency_ms_p95", "rtf"]


def test_report_has_every_field_and_plot(tmp_path, capsys):
    _stage_files(tmp_path)
    assert report.main(["--run", str(tmp_path)]) == 0  # default bar: 10 %
    data = json.loads((tmp_path / "report.json").read_text())
    assert all(k in data for k in REQUIRED)
    assert data["wer"] == 0.05 and data["engine"] == "horovod" and data["onnx_transcripts_match"] is True
    assert (data["wer_greedy"], data["wer_festival"], data["real_fixture_wer"]) == (0.09, 0.25, 1.017)
    assert data["test_substitutions"] == 5 and data["test_frequent_errors"][0]["count"] == 2
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "WER 5.00%" in out and "beam+lm" in out and "WER 9.00%" in out and "greedy" in out
    assert "WER 25.00%" in out and "WER 101.70%" in out


def test_report_without_the_extra_evaluations_says_not_run(tmp_path, capsys):
    _stage_files(tmp_path, extra=False)
    assert report.main(["--run", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["wer_festival"] is None and data["real_fixture_wer"] is None and data["wer_greedy"] is None
    assert "not run" in capsys.readouterr().out


@pytest.mark.parametrize("wer,match", [(0.11, True), (0.05, False)])
def test_report_fails_above_bar_or_on_mismatch(tmp_path, wer, match, capsys):
    _stage_files(tmp_path, wer=wer, match=match)
    assert report.main(["--run", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err


def test_report_fails_when_training_replicas_differ(tmp_path, capsys):
    _stage_files(tmp_path)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    (tmp_path / "train_summary.json").write_text(json.dumps({**summary, "replicas_identical": False}))
    assert report.main(["--run", str(tmp_path)]) == 1
    assert "replicas differ at the end of training" in capsys.readouterr().err
    assert json.loads((tmp_path / "report.json").read_text())["replicas_identical"] is False


def test_missing_stage_is_named(tmp_path, capsys):
    _stage_files(tmp_path)
    (tmp_path / "latency.json").unlink()
    assert report.main(["--run", str(tmp_path)]) == 2
    assert "latency.json" in capsys.readouterr().err


def test_report_puts_the_peer_beside_ours(tmp_path, capsys):
    _stage_files(tmp_path)
    for name, w, rtf in (("test", 0.766, 0.2), ("festival", 0.2, 0.19), ("real", 0.31, 0.19)):
        (tmp_path / f"peer_{name}.json").write_text(json.dumps({"peer": "pocketsphinx en-us", "wer": w,
                                                                "rtf": rtf, "utterances": 4}))
    assert report.main(["--run", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert (data["peer_wer"], data["peer_wer_festival"], data["peer_real_fixture_wer"]) == (0.766, 0.2, 0.31)
    assert data["peer_rtf"] == 0.2
    # ours: test 5 % < 76.6 %, festival 25 % > 20 %, real 101.7 % > 31 %, RTF 0.01 < 0.2
    assert data["beats_peer_on"] == ["test", "speed"]
    out = capsys.readouterr().out
    assert "peer      WER 76.60% test, 20.00% festival, 31.00% real" in out and "we beat it on: test, speed" in out


def test_report_without_peer_runs_has_no_peer_lines(tmp_path, capsys):
    _stage_files(tmp_path)
    assert report.main(["--run", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["beats_peer_on"] is None
    assert "  peer  " not in capsys.readouterr().out


def test_report_splits_the_test_by_engine_with_the_corpus(tmp_path, capsys):
    """--data: wer_by_engine from each hypothesis and its manifest's engine; wer becomes the espeak-ng
    part; train_engines from train.jsonl; the peer split the same way."""
    run, data = tmp_path / "run", tmp_path / "va"
    run.mkdir()
    data.mkdir()
    _stage_files(run)
    rows = {"t1": ("espeak", "turn on the light", "turn on the light"),
            "t2": ("espeak", "set an alarm", "set an alarm"),
            "t3": ("mbrola", "play some jazz", "play sum jazz"),        # 1 of 3 words wrong
            "t4": ("pico", "what time is it", "what is it")}            # 1 of 4 deleted
    ev = json.loads((run / "eval.json").read_text())
    ev["hypotheses"] = {i: {"ref": r, "hyp": h} for i, (_, r, h) in rows.items()}
    (run / "eval.json").write_text(json.dumps(ev))
    (run / "peer_test.json").write_text(json.dumps({"peer": "p", "wer": 0.5, "rtf": 0.2, "utterances": 4,
                                                    "hypotheses": [{"id": i, "ref": r, "hyp": ""}
                                                                   for i, (_, r, _h) in rows.items()]}))

    def line(i, e, t):
        return json.dumps({"id": i, "audio": f"{i}.wav", "duration": 1800.0, "text": t, "speaker": "s", "engine": e})

    (data / "test.jsonl").write_text("\n".join(line(i, e, r) for i, (e, r, _) in rows.items()) + "\n")
    (data / "train.jsonl").write_text("\n".join(line(f"a{i}", e, "x") for i, e in
                                                enumerate(["espeak", "espeak", "rhvoice"])) + "\n")
    assert report.main(["--run", str(run), "--data", str(data)]) == 0
    r = json.loads((run / "report.json").read_text())
    assert r["wer_by_engine"] == {"espeak": 0.0, "mbrola": round(1 / 3, 4), "pico": 0.25}
    assert r["wer"] == 0.0 and r["wer_all_engines"] == 0.05 and r["cer"] == 0.0 and r["test_utterances"] == 2
    assert r["train_engines"] == ["espeak", "rhvoice"] and r["train_hours_by_engine"] == {"espeak": 1.0, "rhvoice": 0.5}
    assert r["peer_wer_by_engine"] == {"espeak": 1.0, "mbrola": 1.0, "pico": 1.0} and r["peer_wer"] == 1.0
    assert "mbrola 33.33%" in capsys.readouterr().out
