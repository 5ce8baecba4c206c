"""hpc_asr.bench.ablation: each variant switches exactly its augmentation, the stages are the demo's
commands, the lock excludes other jobs, and (slow) the whole runner on a toy corpus."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields

import helpers
import pytest
from conftest import ROOT, run_env

from hpc_asr.bench import ablation
from hpc_asr.cli import load_config
from hpc_asr.config import ModelConfig

DEMO = str(ROOT / "hpc_asr" / "configs" / "demo.yaml")


def _cfg(name):
    if name.startswith("all_utt") and "cmvn" not in {f.name for f in fields(ModelConfig)}:
        pytest.skip("model.cmvn is not a config key yet")
    return load_config(DEMO, [f"--{o}" for o in ablation.VARIANTS[name]])


@pytest.mark.parametrize("name", list(ablation.VARIANTS))
def test_every_variant_is_a_valid_config(name):
    cfg = _cfg(name)
    assert cfg.augment.enabled is (name != "none")


@pytest.mark.parametrize("name, speed, noise, reverb", [
    ("speed", True, False, False), ("noise", False, True, False), ("reverb", False, False, True),
    ("all", True, True, True)])
def test_each_single_part_variant_switches_on_only_its_part(name, speed, noise, reverb):
    a = _cfg(name).augment
    assert (a.speeds != "", a.noise_prob > 0, a.reverb_prob > 0) == (speed, noise, reverb)


def _args(tmp_path, **kw):
    base = dict(config=DEMO, out=str(tmp_path / "runs"), data=str(tmp_path / "data"), hours=0.5, dev_utts=20,
                festival_utts=10, steps=7, np=2, lock="")
    return argparse.Namespace(**{**base, **kw})


def test_variant_commands_are_the_demo_stages_with_the_variant_overrides(tmp_path):
    cmds = ablation.variant_commands("noise", ablation.VARIANTS["noise"], _args(tmp_path))
    verbs = [" ".join(c[c.index("-m") + 1 : c.index("-m") + 4]) for c in cmds]
    assert verbs == ["hpc_asr prep augment", "hpc_asr prep fbank", "hpc_asr train --config",
                     "hpc_asr evaluate --checkpoint", "hpc_asr evaluate --checkpoint"]
    assert all(c[c.index("-np") + 1] == "2" for c in cmds)
    assert "--augment.speeds=" in cmds[0] and "--augment.reverb_prob=0" in cmds[0]
    train = cmds[2]
    assert train[train.index("--train.max_steps") + 1] == "7" and "--augment.speeds=" in train
    assert [c[c.index("--decoder") + 1] for c in cmds[3:]] == ["greedy", "greedy"]
    assert [c[c.index("--data") + 1].rsplit("/", 1)[1] for c in cmds[3:]] == ["dev", "test_festival"]


def test_lock_is_held_for_the_block_and_released(tmp_path):
    lock = tmp_path / "cpu.lock"
    probe = ["flock", "-n", str(lock), "true"]
    with ablation.locked(str(lock)):
        assert subprocess.run(probe).returncode == 1  # another job cannot take it
    assert subprocess.run(probe).returncode == 0


def test_plot_writes_a_png(tmp_path):
    rows = [{"variant": v, "dev_wer": 0.3 + i / 10, "festival_wer": 0.8} for i, v in enumerate(["none", "all"])]
    ablation.plot(rows, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv", [["--variants", "none,loud"], ["--steps", "0"], ["--variants", ""]])
def test_bad_arguments_are_one_line(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpc_asr", "bench", "ablation", "--out", str(tmp_path), *argv],
                          capture_output=True, text=True, cwd=ROOT, env=run_env())
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")


@pytest.mark.slow
def test_ablation_end_to_end_on_a_toy_corpus(tmp_path):
    argv = [sys.executable, "-m", "hpc_asr", "bench", "ablation", "--out", str(tmp_path / "runs"), "--data",
            str(tmp_path / "data"), "--hours", "0.02", "--dev-utts", "8", "--festival-utts", "4", "--steps", "3",
            "--variants", "none,speed", "--lock", str(tmp_path / "lock")]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=run_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "runs" / "ablation.json").read_text())
    assert [r["variant"] for r in res["variants"]] == ["none", "speed"]
    none, speed = res["variants"]
    assert none["steps"] == speed["steps"] == 3 and res["setting"]["festival_utterances"] == 4
    assert speed["train_hours"] > 1.8 * none["train_hours"]  # one augmented copy per utterance
    for r in res["variants"]:
        assert r["dev_utterances"] == 8 and 0 <= r["dev_wer"] and 0 <= r["festival_wer"]
        # 3 steps already beat a freshly initialised model (measured 0.82 against 0.92)
        ckpt, dev = tmp_path / "runs" / r["variant"] / "last.pt", tmp_path / "data" / "fbank" / "dev"
        baseline = helpers.untrained_cer(ckpt, dev)
        assert 0 < r["dev_cer"] < baseline, (r["variant"], r["dev_cer"], baseline)
    assert (tmp_path / "runs" / "ablation.png").stat().st_size > 1000
    again = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=run_env(), timeout=300)
    assert again.returncode == 0 and json.loads((tmp_path / "runs" / "ablation.json").read_text()) == res


def test_table_shows_each_variant_against_the_baseline():
    rows = [{"variant": v, "overrides": [f"x={i}"], "dev_wer": 0.5 - i / 10, "dev_cer": 0.2, "festival_wer": 1.0,
             "festival_cer": 0.6 + i / 100, "train_hours": 1.0 + i} for i, v in enumerate(["none", "all"])]
    lines = ablation.table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| none | x=0 | 50.0 | 20.0 |")
    assert "| 40.0 (-10.0) | 20.0 (+0.0) | 100.0 (+0.0) | 61.0 (+1.0) | 2.00 |" in lines[3]
