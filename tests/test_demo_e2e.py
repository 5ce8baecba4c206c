"""The whole `make demo` path at toy size through the real Makefile: espeak-ng corpus → 2-rank
MPI FBANK → 2-rank Horovod training → evaluate → ONNX export with parity → latency → report."""

import json
import subprocess
import time

import helpers
import pytest
from conftest import ROOT, run_env

TINY = """
data: {max_frames: 3000, max_utts: 32}
specaug: {freq_warp: 0.1}
model: {d_model: 64, n_heads: 2, n_layers: 1, subsampling: conv1d, conv_norm: batch}
train: {epochs: 1, lr: 3.0e-3, warmup_steps: 5, log_every: 2, threads: 1}
dist: {engine: horovod, compression: fp16}
"""


def _budget_recipe(run) -> str:
    """The Makefile's own lines that set the demo's training budget (`make -n` prints them)."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", f"RUN={run}"], capture_output=True, text=True,
                         check=True, env=run_env()).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "train_budget_s ]" in line)
    end = next(i for i in range(start, len(lines)) if "training for" in lines[i])
    return "\n".join(lines[start:end + 1])


@pytest.mark.parametrize("before, expected", [(758, 1800 - 758 - 227),   # this machine: 30 % of 758 s kept after
                                              (400, 1800 - 400 - 180),   # at least AFTER_TRAIN_S (180 s)
                                              (1198, 1800 - 1198 - 359),  # 1.58x slower: it keeps 359 s, not 270
                                              (1750, 120)])              # past the deadline: MIN_TRAIN_S
def test_demo_training_budget_keeps_time_for_the_stages_after_it(tmp_path, before, expected):
    (tmp_path / "demo.t0").write_text(f"{int(time.time()) - before}\n")
    recipe = _budget_recipe(tmp_path)
    out = subprocess.run(["bash", "-c", recipe], capture_output=True, text=True, check=True).stdout
    got = int((tmp_path / "train_budget_s").read_text())
    assert abs(got - expected) <= 1, out    # a second may tick between writing demo.t0 and the recipe
    assert f"training for {got}s of the 30 minutes" in out
    (tmp_path / "demo.t0").write_text(f"{int(time.time()) - 5}\n")   # a re-run keeps the budget it was given
    again = subprocess.run(["bash", "-c", recipe], capture_output=True, text=True, check=True).stdout
    assert int((tmp_path / "train_budget_s").read_text()) == got and "spent before training" not in again


@pytest.mark.slow
def test_make_demo_end_to_end(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    data, run = tmp_path / "va", tmp_path / "run"
    args = ["make", "-C", str(ROOT), "demo", "HOURS=0.03", f"DATA={data}", f"RUN={run}", f"CONFIG={cfg}",
            "BAR_WER=10", "SYNTH_ARGS=--dev-utts 20 --test-utts 20 --festival-utts 10"]
    # a 1-epoch toy model: this test checks the plumbing; the demo's own bar (10 %) checks quality
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=run_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["ranks"] == 2 and report["engine"] == "horovod" and report["compression"] == "fp16"
    assert report["replicas_identical"] is True
    assert report["test_utterances"] > 0 and 0 <= report["cer"] and report["train_hours"] > 0
    assert report["onnx_transcripts_match"] is True and report["onnx_max_abs_diff"] < 1e-3
    assert report["latency_ms_p50"] > 0 and report["rtf"] > 0
    assert (run / "loss_curve.png").stat().st_size > 1000
    for key in ("wer", "wer_greedy", "wer_festival", "real_fixture_wer"):  # every split was scored
        assert isinstance(report[key], float), key
    # issue 16: four training engines, festival only in its test split; the test scored per engine
    assert report["train_engines"] == ["espeak", "mbrola", "pico", "rhvoice"]
    assert set(report["wer_by_engine"]) == set(report["train_engines"])
    assert report["wer"] == report["wer_by_engine"]["espeak"] and isinstance(report["wer_all_engines"], float)
    # the report's test figures are the ones the test hypotheses score
    assert helpers.rescored(run / "eval.json") == pytest.approx((report["wer_all_engines"], report["cer_all_engines"]),
                                                                abs=1e-4)
    index = json.loads((data / "fbank" / "train" / "index.json").read_text())
    assert index["ranks"] == 2 and len(index["shards"]) >= 1  # ranks claim work units: one may take all
    # Re-running is cheap: every stage sees its outputs are up to date.
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=run_env())
    assert again.returncode == 0
    assert "corpus up to date" in again.stdout + again.stderr
    assert "up to date" in again.stderr


README_MARGIN = 0.04  # the machine's speed moves it: 1.04 % on a fast hour (README), 2.96-4.59 % on slow ones, dropout
ISSUE16_FESTIVAL = 0.30  # issue 16's festival target: 21.8 % (README), 28.2 / 31.9 % on slower hours with dropout
ISSUE16_ESPEAK = 0.05  # issue 16's espeak target, met by every time-budgeted run (1.04-4.59 %)
ENGINE_BOUND = 0.30  # held-out voices: MBROLA 5.7-13.3 %, RHVoice 6.6-15.7 %, Pico 17.5-28.1 % (10 %: Pico not)


def readme_wer() -> float:
    """The test WER (beam+LM) the README's demo summary claims, as a fraction."""
    import re

    text = (ROOT / "README.md").read_text()
    found = re.findall(r"WER (\d+(?:\.\d+)?)%\s+CER \d+(?:\.\d+)?%\s+beam\+lm", text)
    assert len(found) == 1, f"README.md: expected one 'WER x%  CER y%  beam+lm' line in the demo summary, got {found}"
    return float(found[0]) / 100


def assert_demo_wer(report: dict) -> None:
    bar = readme_wer() + README_MARGIN
    assert report["wer"] <= bar, (f"make demo: test WER {report['wer']:.2%} (beam+LM) above the README's "
                                  f"{readme_wer():.2%} + {README_MARGIN:.2%} margin")


@pytest.mark.demo
def test_make_demo_reaches_the_wer_the_readme_claims(tmp_path):
    """The real `make demo` (default size and config, 30 min on 2 cores by construction): the test
    WER it reports is the README's claim within the stated margin and issue 16's 5 %, and the
    Makefile's own bar is set to it too. On a slower machine training gets less time (README):
    run it where the README's numbers were measured, or with DEMO_MINUTES raised."""
    data, run = tmp_path / "va", tmp_path / "run"
    bar = readme_wer() + README_MARGIN
    proc = subprocess.run(["make", "-C", str(ROOT), "demo", f"DATA={data}", f"RUN={run}", f"BAR_WER={bar:.4f}"],
                          capture_output=True, text=True, timeout=3 * 3600, env=run_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["test_utterances"] >= 100 and report["onnx_transcripts_match"] is True
    assert_demo_wer(report)
    # issue 16: four engines trained on, festival never; its festival and espeak targets
    assert report["train_engines"] == ["espeak", "mbrola", "pico", "rhvoice"]
    assert report["wer_festival"] <= ISSUE16_FESTIVAL, report["wer_festival"]
    assert report["wer"] <= ISSUE16_ESPEAK, report["wer"]
    assert max(report["wer_by_engine"].values()) <= ENGINE_BOUND, report["wer_by_engine"]
    assert report["train_wall_s"] >= 300, "training got under 5 minutes: the machine is far slower than the README's"
