"""Config loading: YAML sections, CLI overrides with type coercion, and loud failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run

from hpc_asr.cli import load_config, parse_cli
from hpc_asr.config import Config, ConfigError


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
    proc = subprocess.run([sys.executable, "-m", "hpc_asr", "train", "--model.nope", "1"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0], proc.stderr


def test_train_cli_names_missing_prepared_data(tmp_path):
    proc = run([sys.executable, "-m", "hpc_asr", "train", "--dist.engine", "none",
                "--data.train", str(tmp_path / "nope"), "--train.out_dir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope' / 'index.json'}: no feature index "
                                                "(run data_prep.fbank first)"]


# ---- every numeric field and enum is validated, naming section.key and the value ----------

@pytest.mark.parametrize("key, value, match", [
    ("train.accum_steps", "0", ">= 1, got 0"),
    ("train.accum_steps", "-1", ">= 1, got -1"),
    ("train.epochs", "0", ">= 1"),
    ("train.lr", "0", "> 0"),
    ("train.lr", "-1e-3", "> 0"),
    ("train.lr", ".nan", "finite"),
    ("train.lr", ".inf", "finite"),
    ("train.warmup_steps", "-5", ">= 0"),
    ("train.weight_decay", "-0.1", ">= 0"),
    ("train.grad_clip", "0", "> 0"),
    ("train.log_every", "0", ">= 1"),
    ("train.threads", "-2", ">= 0"),
    ("train.max_steps", "-1", ">= 0"),
    ("train.seed", "-1", ">= 0"),
    ("train.ckpt_every_steps", "-3", ">= 0"),
    ("train.keep_last", "0", ">= 1"),
    ("train.ref_batch_frames", "0", "> 0"),
    ("train.bpe_vocab_size", "0", ">= 1"),
    ("train.precision", "fp8", "fp32|fp16|bf16, got 'fp8'"),
    ("train.lr_scaling", "cubic", "none|linear|sqrt"),
    ("train.tokenizer", "word", "char|bpe"),
    ("data.max_frames", "0", "> 0"),
    ("data.max_utts", "-4", "> 0"),
    ("data.bucket_size", "0", "> 0"),
    ("specaug.freq_masks", "-1", ">= 0"),
    ("specaug.time_width", "1.5", r"in \[0, 1\]"),
    ("specaug.freq_warp", "1", r"in \[0, 1\)"),
    ("model.d_model", "0", "> 0"),
    ("model.n_heads", "-4", "> 0"),
    ("model.n_layers", "0", "> 0"),
    ("model.ff_mult", "0", "> 0"),
    ("model.dropout", "1.0", r"in \[0, 1\)"),
    ("model.dropout", "-0.1", r"in \[0, 1\)"),
    ("model.conv_norm", "group", "layer|batch"),
    ("features.num_mel_bins", "0", "> 0"),
    ("features.sample_rate", "-16000", "> 0"),
    ("features.dither", "-1", ">= 0"),
    ("features.frame_shift_ms", "0", "> 0"),
    ("export.atol", "0", "> 0"),
    ("export.opset", "0", ">= 1"),
    ("dist.engine", "mpi", "dist.engine"),
])
def test_every_field_is_validated(key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [f"--{key}", value])
    assert key in str(e.value)


def test_dist_numeric_knobs_refuse_negatives():
    from hpc_asr.config import DistConfig

    defaults = vars(DistConfig())
    numeric = [k for k, v in defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert numeric  # fusion threshold, cycle time, predivide factor, ...
    for name in numeric:
        with pytest.raises(ConfigError, match=f"dist.{name}"):
            load_config(None, [f"--dist.{name}", "-1"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"average_last=5 > train\.keep_last=3"):
        load_config(None, ["--train.average_last", "5", "--train.ckpt_every_steps", "10"])
    with pytest.raises(ConfigError, match="ckpt_every_steps"):
        load_config(None, ["--train.average_last", "2"])
    with pytest.raises(ConfigError, match=r"train\.amp=true conflicts"):
        load_config(None, ["--train.amp", "true", "--train.precision", "bf16"])


def test_sections_validate_when_built_in_code():
    from hpc_asr.config import DataConfig, TrainConfig

    with pytest.raises(ConfigError, match=r"train\.accum_steps must be >= 1, got 0"):
        TrainConfig(accum_steps=0)
    with pytest.raises(ConfigError, match=r"data\.max_frames must be a finite int, got '100'"):
        DataConfig(max_frames="100")


def test_valid_presets_load():
    for p in sorted((Path(__file__).resolve().parents[1] / "hpc_asr" / "configs").glob("*.yaml")):
        load_config(p)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_train_cli_rejects_bad_accum_steps_in_one_line(value):
    proc = subprocess.run([sys.executable, "-m", "hpc_asr", "train", "--train.accum_steps", value],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: command line: train.accum_steps must be >= 1, got {value}"]


def test_model_cmvn_is_validated():
    from hpc_asr.config import ModelConfig

    assert ModelConfig().cmvn == "global"
    with pytest.raises(ConfigError, match=r"model\.cmvn must be global\|utterance_mean\|utterance, got 'speaker'"):
        ModelConfig(cmvn="speaker")
    assert load_config(None, ["--model.cmvn", "utterance"]).model.cmvn == "utterance"


def test_every_preset_builds_the_model_docs_training_md_documents():
    """Each preset in hpc_asr/configs loads, has a row in docs/training.md's preset table, and
    builds a model whose parameter count is the documented one (to the digits written there)."""
    import re

    from hpc_asr.data.tokenizer import CharTokenizer
    from hpc_asr.model import ConformerCTC

    root = Path(__file__).resolve().parents[1]
    rows = re.findall(r"^\| `(\w+)\.yaml` \|[^|]*\| ([\d.]+) M \|", (root / "docs" / "training.md").read_text(), re.M)
    documented = {name: value for name, value in rows}
    presets = sorted(p.stem for p in (root / "hpc_asr" / "configs").glob("*.yaml"))
    assert sorted(documented) == presets, "docs/training.md's preset table and hpc_asr/configs differ"
    for name in presets:
        cfg = load_config(root / "hpc_asr" / "configs" / f"{name}.yaml")
        cfg.model.vocab_size = (CharTokenizer().vocab_size if cfg.train.tokenizer == "char"
                                else cfg.train.bpe_vocab_size + 1)  # + the CTC blank
        params = ConformerCTC(cfg.model, cfg.features.num_mel_bins).num_params() / 1e6
        written = documented[name]
        decimals = len(written.partition(".")[2])
        assert round(params, decimals) == float(written), f"{name}: {params:.3f} M parameters, docs say {written} M"
