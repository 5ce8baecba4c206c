"""Config loading: YAML sections, CLI overrides with type coercion, and loud failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run

from hpc_asr.config import Config, ConfigError, load_config, parse_cli


@pytest.fixture()
def yaml_file(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("model:\n  d_model: 64\n  n_heads: 4\ntrain:\n  epochs: 3\n  lr: 1.0e-3\n"
                 "dist:\n  engine: torch\n")
    return p


def test_defaults_when_no_file():
    assert load_config().to_dict() == Config().to_dict()


def test_yaml_values_and_untouched_defaults(yaml_file):
    cfg = load_config(yaml_file)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.train.epochs, cfg.train.lr) == (64, 4, 3, 1e-3)
    assert cfg.dist.engine == "torch"
    assert cfg.model.n_layers == Config().model.n_layers  # absent keys keep their defaults


@pytest.mark.parametrize("style", ["space", "equals"])
def test_overrides_coerce_types(yaml_file, style):
    pairs = [("train.lr", "3e-4"),  # YAML 1.1 reads this as a string; the float field must coerce it
             ("train.epochs", "7"), ("specaug.enabled", "off"), ("train.amp", "yes"),
             ("data.train", "123"), ("model.dropout", "0"), ("dist.compression", "none")]
    argv = []
    for k, v in pairs:
        argv += [f"--{k}", v] if style == "space" else [f"--{k}={v}"]
    cfg = load_config(yaml_file, argv)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.specaug.enabled is False and cfg.train.amp is True
    assert cfg.data.train == "123"  # str fields stay strings even when the value looks numeric
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.dist.compression == "none"
    assert cfg.model.d_model == 64  # the file still applies where not overridden


def test_override_beats_file(yaml_file):
    assert load_config(yaml_file, ["--train.epochs=9"]).train.epochs == 9


def test_equals_value_may_contain_equals():
    assert load_config(None, ["--train.out_dir=runs/a=b"]).train.out_dir == "runs/a=b"


@pytest.mark.parametrize("argv, names", [
    (["--model.nope", "1"], ["model", "nope"]),
    (["--modle.d_model", "1"], ["modle"]),
    (["--train.learning_rate=1"], ["train", "learning_rate"]),
])
def test_unknown_keys_are_named(argv, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, argv)
    for n in names:
        assert n in str(e.value)


def test_unknown_key_in_yaml_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz") as e:
        load_config(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("argv, match", [
    (["--train.epochs", "abc"], "train.epochs"),
    (["--train.epochs", "2.5"], "integer"),
    (["--train.lr", "fast"], "train.lr"),
    (["--specaug.enabled", "maybe"], "boolean"),
    (["--train.epochs", "true"], "train.epochs"),  # a bool is not an int, although Python says so
    (["--dist.engine", "mpi"], "dist.engine"),
    (["--dist.compression", "int8"], "dist.compression"),
    (["--model.conv_kernel", "4"], "odd"),
    (["--model.subsampling", "conv3d"], "model.subsampling"),
])
def test_bad_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, argv)


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match=r"d_model=30.*n_heads=4"):
        load_config(None, ["--model.d_model", "30", "--model.n_heads", "4"])
    assert load_config(None, ["--model.d_model", "32", "--model.n_heads", "4"]).model.d_model == 32


@pytest.mark.parametrize("argv, match", [
    (["--train"], "no value"),
    (["train.epochs", "3"], "unexpected argument"),
    (["--epochs", "3"], "section.key"),
])
def test_malformed_overrides(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, argv)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_parse_cli_exits_2_in_process(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(["--model.nope", "1"], "test")
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error:")


def test_train_cli_rejects_unknown_key():
    # The real entry point must refuse before it touches MPI, Horovod or the data.
    proc = subprocess.run([sys.executable, "-m", "hpc_asr.train", "--model.nope", "1"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0], proc.stderr


def test_train_cli_names_missing_prepared_data(tmp_path):
    proc = run([sys.executable, "-m", "hpc_asr.train", "--dist.engine", "none",
                "--data.train", str(tmp_path / "nope"), "--train.out_dir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope' / 'index.json'}: no feature index "
                                                "(run data_prep.fbank first)"]
