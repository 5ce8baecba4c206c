"""Shared test helpers: the --runslow switch and a real `mpirun` command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run end-to-end tests marked slow")
    parser.addoption("--rundemo", action="store_true",
                     help="also run the full-size `make demo` test (30 min by its deadline; `make test-demo`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test (minutes); run with --runslow")
    config.addinivalue_line("markers", "demo: the full-size make demo (half an hour); run with --rundemo")


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.skip(reason="slow end-to-end test; use --runslow")
    demo = pytest.mark.skip(reason="the full-size make demo (30 min); use --rundemo (make test-demo)")
    for item in items:
        if "demo" in item.keywords and not config.getoption("--rundemo"):
            item.add_marker(demo)
        elif "slow" in item.keywords and not (config.getoption("--runslow") or config.getoption("--rundemo")):
            item.add_marker(slow)


def mpirun_cmd(np: int, *args: str) -> list[str]:
    """`mpirun -np N python ARGS...` that works as root and on 2-core machines."""
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: run `make setup` (installs openmpi-bin)")
    return ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(np), sys.executable, *args]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT))
    env.pop("OMPI_COMM_WORLD_RANK", None)
    return env


def run(cmd: list[str], timeout: int = 300, check: bool = True, cwd: Path | None = None):
    """Run a command with the repo on PYTHONPATH; on failure show its output in the assertion."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env(), cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def librispeech_dir() -> Path:
    d = FIXTURES / "LibriSpeech"
    if not d.is_dir():
        pytest.fail(f"{d}: LibriSpeech fixture missing (expected beside the repo in shared/fixtures)")
    return d
