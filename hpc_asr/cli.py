"""Where a config comes from: a YAML file, then ``--section.key value`` overrides from the command
line. The one reader of config files and the one parser of overrides (train, evaluate, jobs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hpc_asr.config import Config, ConfigError

__all__ = ["OVERRIDE_HELP", "load_config", "override_pairs", "parse_cli", "read_yaml_mapping"]


def read_yaml_mapping(path: str | Path, what: str, shape: str = "a mapping", error: type | None = None) -> dict:
    """A YAML file whose top level is a mapping; missing, malformed or other shapes raise
    ``error`` (ConfigError) in one line naming the file. The config and the jobs site file read this way."""
    error = error or ConfigError
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: {what} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{p}: top level must be {shape}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or defaults when ``path`` is None) and apply ``--section.key value`` overrides.
    A bad key or value in the file is blamed on the file; one on the command line on the command
    line (a typo in ``--train.epocs`` is not the YAML's fault)."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        raw = read_yaml_mapping(path, "config file", "a mapping of sections")
        where = str(path)
    cfg = Config.from_dict(raw, where)
    if not overrides:
        return cfg
    raw = cfg.to_dict()
    for key, value in override_pairs(overrides):
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"command line: --{key}: expected --section.key value, e.g. --train.epochs 3")
        raw.setdefault(section, {})[name] = yaml.safe_load(value) if value != "" else ""
    return Config.from_dict(raw, "command line")


OVERRIDE_HELP = ("Any config key can be overridden as --section.key value (or --section.key=value), e.g. "
                 "--train.epochs 3 --data.max_frames 8000; sections: features, data, specaug, model, train, "
                 "dist, export, decode, augment, serve.")


def override_pairs(args: list[str]) -> list[tuple[str, str]]:
    """``--section.key value`` / ``--section.key=value`` arguments as (key, value) pairs: the one
    parser of command-line overrides (train, evaluate, jobs)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.key value")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {a} has no value")
        out.append((key, value))
    return out


def parse_cli(argv: list[str] | None, description: str, extra=None) -> tuple[Config, Any]:
    """Shared CLI: ``--config FILE`` plus ``--section.key value`` overrides.

    ``extra(parser)`` may add command-specific flags (plain names without a dot).
    Returns the config and the argparse namespace.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description, epilog=OVERRIDE_HELP)
    parser.add_argument("--config", help="YAML config (sections: features, data, model, ...)")
    if extra is not None:
        extra(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, args
