"""The site file: how HPC staff describe their cluster to hpc_asr (``env/site.yaml``), and the
NCCL/InfiniBand preset file it names (``env/nccl.env``). This module is the one reader of both:
``hpc-asr jobs`` renders job scripts from them and ``env/provision.sh`` writes the modulefiles
with them (``python -m hpc_asr.ops.site``).

Where the site file comes from, first match wins (never from the installed package):

1. ``--site FILE``;
2. ``$HPC_ASR_SITE`` (the hpc_asr modulefile sets it to the install's own ``env/site.yaml``);
3. ``$HPC_ASR_HOME/env/site.yaml`` (the install prefix, also set by the modulefile);
4. ``./env/site.yaml`` (running from a checkout).

A relative ``nccl_env`` is read next to the site file, so ``--site`` moves it too.

    python -m hpc_asr.ops.site nccl-env [--site FILE]   # the presets as KEY=VALUE, validated
    python -m hpc_asr.ops.site install --site FILE --dest PREFIX/env   # copy both into an install
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpc_asr.cli import read_yaml_mapping

__all__ = ["SCHEDULERS", "JobError", "Site", "find_site", "load_site", "parse_nccl_env"]

SCHEDULERS = ("pbs", "slurm")


class JobError(ValueError):
    """A site file, option or resource request that cannot work; the message names it."""


@dataclass
class Site:
    """The cluster as HPC staff describe it (``env/site.yaml``); see that file for each key."""

    scheduler: str = "slurm"
    partition: str = ""
    account: str = ""
    walltime: str = "24:00:00"
    prep_walltime: str = "04:00:00"
    node_cpus: int = 0  # 0 = unknown: no fit check at render time
    cpus_per_task: int = 1
    cpu_ranks_per_node: int = 1
    cpu_bind: str = "none"
    env: dict = field(default_factory=lambda: {"modules": [], "venv": ""})
    nccl_env: str = ""  # "" = no presets; relative paths are relative to the site file's directory
    local_scratch: str = "${TMPDIR:-/tmp}"
    requeue_signal_s: int = 120
    modulefile: dict = field(default_factory=dict)
    path: str = "(defaults)"  # as given: rendered scripts name it, so keep it as the user wrote it

    def nccl_path(self) -> Path | None:
        if not self.nccl_env:
            return None
        p = Path(self.nccl_env)
        return p if p.is_absolute() else Path(self.path).parent / p

    def nccl_vars(self) -> list[tuple[str, str]]:
        """(KEY, VALUE) pairs of the NCCL/IB preset file, comments dropped."""
        p = self.nccl_path()
        if p is None:
            return []
        if not p.is_file():
            raise JobError(f"{self.path}: nccl_env: {p} not found")
        return parse_nccl_env(p)


def parse_nccl_env(path: Path) -> list[tuple[str, str]]:
    """``KEY=VALUE`` lines, ``#`` comments and blank lines skipped; anything else fails naming the line."""
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not key.replace("_", "").isalnum() or key[0].isdigit():
            raise JobError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        if any(c in value for c in "\"'`$\\"):  # inlined into job scripts and modulefiles verbatim
            raise JobError(f"{path}:{n}: {key}: quotes, $ and \\ are not allowed in a value, got {value!r}")
        pairs.append((key, value))
    return pairs


def find_site(path: str | Path | None = None) -> Path:
    """The site file by the lookup order above; none found fails with what was tried."""
    if path:
        return Path(path)
    if os.environ.get("HPC_ASR_SITE"):
        return Path(os.environ["HPC_ASR_SITE"])
    home = os.environ.get("HPC_ASR_HOME")
    tried = [Path(home) / "env" / "site.yaml"] if home else []
    tried.append(Path("env") / "site.yaml")
    for p in tried:
        if p.is_file():
            return p
    raise JobError(f"no site file: pass --site FILE, set HPC_ASR_SITE, or `module load hpc_asr` "
                   f"(tried {', '.join(map(str, tried))})")


def load_site(path: str | Path | None = None) -> Site:
    """Read the site file; unknown keys and wrong types fail with the file and key named."""
    path = find_site(path)
    raw = read_yaml_mapping(path, "site file", error=JobError)
    fields = {f.name: f for f in dataclasses.fields(Site) if f.name != "path"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise JobError(f"{path}: unknown key(s) {unknown}; expected {sorted(fields)}")
    site = Site(path=str(path))
    for key, value in raw.items():
        default = getattr(site, key)
        if value is None:
            value = type(default)()
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise JobError(f"{path}: {key} must be an integer, got {value!r}")
        if isinstance(default, dict) and not isinstance(value, dict):
            raise JobError(f"{path}: {key} must be a mapping, got {value!r}")
        setattr(site, key, str(value) if isinstance(default, str) else value)
    if site.scheduler not in SCHEDULERS:
        raise JobError(f"{path}: scheduler must be slurm|pbs, got {site.scheduler!r}")
    if site.cpu_bind not in ("none", "cores"):
        raise JobError(f"{path}: cpu_bind must be none|cores, got {site.cpu_bind!r}")
    unknown_env = sorted(set(site.env) - {"modules", "venv"})
    if unknown_env:
        raise JobError(f"{path}: env: unknown key(s) {unknown_env}; expected ['modules', 'venv']")
    return site


def install(site: Site, dest: Path) -> Path:
    """Copy the site file (as ``site.yaml``) and a relative ``nccl_env`` into ``dest``, the
    install's own ``env/`` that its modulefile points ``HPC_ASR_SITE`` at."""
    nccl = site.nccl_path()
    site.nccl_vars()  # validate before anything is copied
    dest.mkdir(parents=True, exist_ok=True)
    if nccl is not None and not Path(site.nccl_env).is_absolute():
        target = dest / site.nccl_env
        target.parent.mkdir(parents=True, exist_ok=True)
        if nccl.resolve() != target.resolve():
            shutil.copyfile(nccl, target)
    target = dest / "site.yaml"
    if Path(site.path).resolve() != target.resolve():
        shutil.copyfile(site.path, target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc_asr.ops.site", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("nccl-env", help="print the site's NCCL/IB presets as KEY=VALUE lines")
    n.add_argument("--site", help="site file (default: the lookup order in this module's docstring)")
    n.add_argument("file", nargs="?", help="a preset file to check and print instead of the site's")
    i = sub.add_parser("install", help="copy the site file and its nccl_env into an install's env/")
    i.add_argument("--site")
    i.add_argument("--dest", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "nccl-env":
            pairs = parse_nccl_env(Path(args.file)) if args.file else load_site(args.site).nccl_vars()
            print("".join(f"{k}={v}\n" for k, v in pairs), end="")
        else:
            print(install(load_site(args.site), Path(args.dest)))
    except (JobError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
