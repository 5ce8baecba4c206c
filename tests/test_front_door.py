"""The front door: `hpc-asr VERB` == `python -m hpc_asr VERB`, --help on every verb, the card's
aliases, and the layout rules the regroup set (no import cycle, no module over ~400 lines, at most
eight modules directly in hpc_asr/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from hpc_asr.__main__ import VERBS

CONSOLE = Path(sys.executable).with_name("hpc-asr")


def verb_lines() -> list[list[str]]:
    out = []
    for verb, spec in VERBS.items():
        if isinstance(spec, dict):
            out += [[verb, sub] for sub in spec]
        else:
            out.append([verb])
    return out


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)


def test_console_script_lists_every_verb():
    assert CONSOLE.exists(), f"{CONSOLE}: the hpc-asr console script is not installed (setup.py entry_points)"
    proc = run([str(CONSOLE), "--help"])
    assert proc.returncode == 0, proc.stderr
    for verb in VERBS:
        assert f"\n  {verb} " in proc.stdout, (verb, proc.stdout)
    assert "--section.key value" in proc.stdout


@pytest.mark.parametrize("words", verb_lines(), ids=" ".join)
def test_every_verb_has_help(words):
    proc = run([sys.executable, "-m", "hpc_asr", *words, "--help"])
    assert proc.returncode == 0, f"hpc-asr {' '.join(words)} --help: {proc.stderr[-2000:]}"
    assert "usage:" in proc.stdout
    assert f"hpc-asr {' '.join(words)}" in proc.stdout.split("\n")[0] + proc.stdout, proc.stdout[:300]


def test_unknown_verb_is_one_line():
    proc = run([sys.executable, "-m", "hpc_asr", "trian"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "'trian'" in proc.stderr


def test_train_help_shows_the_override_syntax():
    proc = run([sys.executable, "-m", "hpc_asr", "train", "--help"])
    assert "--section.key value" in proc.stdout and "--train.epochs 3" in proc.stdout


def test_lm_without_sub_verb_builds(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav", "text": "set a timer"}\n')
    proc = run([sys.executable, "-m", "hpc_asr", "lm", "--manifest", str(manifest), "--order", "2",
                "--out", str(tmp_path / "lm.arpa")])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "lm.arpa").read_text().lstrip().startswith("\\data\\")


@pytest.mark.parametrize("module", ["hpc_asr.train", "data_prep.fbank", "hpc_asr.ops.jobs"])
def test_card_aliases_still_work(module):
    proc = run([sys.executable, "-m", module, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_layout_rules():
    proc = run([sys.executable, str(ROOT.parent / "shared" / "tools" / "import_graph.py"), ".", "hpc_asr",
                "data_prep"])
    if proc.returncode != 0 and "No such file" in proc.stderr:
        pytest.skip("../shared/tools/import_graph.py is not beside this checkout")
    first = proc.stdout.splitlines()[0]
    assert "cycles=0" in first, proc.stdout
    flat = [p for p in (ROOT / "hpc_asr").glob("*.py")]
    assert len(flat) <= 8, sorted(p.name for p in flat)
    for path in list((ROOT / "hpc_asr").rglob("*.py")) + list((ROOT / "data_prep").rglob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= 420, f"{path.relative_to(ROOT)}: {lines} lines (the regroup's limit is ~400)"
    for path in (ROOT / "data_prep").rglob("*.py"):
        assert "hpc_asr.bench" not in path.read_text(), f"{path}: data_prep must not import hpc_asr.bench"
