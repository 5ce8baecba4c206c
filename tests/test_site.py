"""The site file: one-line errors, the shipped file, where it is found (--site, $HPC_ASR_SITE, the
module's env/; never the installed package), nccl.env beside it, and `python -m hpc_asr.ops.site`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from jobs_helpers import jobs, site_file

from hpc_asr.ops.site import load_site


def test_bad_site_file_is_one_line(tmp_path):
    bad = site_file(tmp_path, partiton="gpu")
    proc = jobs("render", "--site", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "unknown key(s) ['partiton']" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    bad = site_file(tmp_path, node_cpus="many")
    proc = jobs("render", "--site", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "node_cpus must be an integer" in proc.stderr


def test_shipped_site_file_loads():
    site = load_site(ROOT / "env" / "site.yaml")
    assert site.scheduler == "slurm" and site.cpus_per_task * 8 <= site.node_cpus
    keys = dict(site.nccl_vars())
    assert keys["HDF5_USE_FILE_LOCKING"] == "FALSE" and keys["NCCL_IB_DISABLE"] == "0"


def _installed_copy(tmp_path: Path) -> Path:
    """hpc_asr installed non-editable into a fresh venv, as env/setup-local.sh --no-editable does
    (the shared venv's packages reachable through a .pth, the checkout not at all)."""
    import shutil
    import sysconfig

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "data", "runs", "tests", "jobs",
                                                               "__pycache__", "*.egg-info", "build", "docs"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "shared-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPC_ASR_SITE", "HPC_ASR_HOME")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          str(src)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert pip.returncode == 0, pip.stderr
    shutil.rmtree(src)  # nothing may come from the source tree
    where = subprocess.run([str(py), "-c", "import hpc_asr; print(hpc_asr.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert where.stdout.startswith(purelib), where.stdout + where.stderr
    return py


def test_an_installed_toolkit_renders_with_the_modules_site_file(tmp_path):
    """issue 17.2: after a non-editable install render looked for env/site.yaml and env/nccl.env
    under site-packages, and --site did not move the nccl.env lookup."""
    py = _installed_copy(tmp_path)
    prefix = tmp_path / "prefix" / "env"  # what provision.sh leaves: PREFIX/env/{site.yaml,nccl.env}
    prefix.mkdir(parents=True)
    for name in ("site.yaml", "nccl.env"):
        (prefix / name).write_text((ROOT / "env" / name).read_text())
    (prefix / "nccl.env").write_text((ROOT / "env" / "nccl.env").read_text() + "NCCL_FROM_MODULE=1\n")
    work = tmp_path / "project"  # a user's directory, outside the checkout, with its data
    (work / "va").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (work / "va" / f"{split}.jsonl").write_text("")
    (work / "tiny.yaml").write_text(json.dumps({"data": {s: f"va/fbank/{s}" for s in ("train", "dev", "test")}}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPC_ASR_SITE", "HPC_ASR_HOME")}

    def render_here(*extra: str, **more_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(py), "-m", "hpc_asr", "jobs", "render", "--config", "tiny.yaml", "--out", "jobs",
                               "--gpus-per-node", "8", *extra], capture_output=True, text=True, cwd=work,
                              env={**env, **more_env}, timeout=120)

    proc = render_here()  # no site file anywhere: one line, never the package directory's
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: no site file: pass --site FILE, set HPC_ASR_SITE, or `module load hpc_asr`")
    for how in (["--site", str(prefix / "site.yaml")], []):  # --site, then $HPC_ASR_SITE as the module sets it
        proc = render_here(*how, **({} if how else {"HPC_ASR_SITE": str(prefix / "site.yaml")}))
        assert proc.returncode == 0, proc.stderr
        train = (work / "jobs" / "train.sbatch").read_text()
        assert 'export NCCL_FROM_MODULE="${NCCL_FROM_MODULE:-1}"' in train  # nccl.env beside the site file
        assert "module load hpc_asr" in train
        assert "--manifest va/train.jsonl" in (work / "jobs" / "prep.sbatch").read_text()
    proc = render_here(HPC_ASR_HOME=str(prefix.parent))  # an older modulefile: only HPC_ASR_HOME
    assert proc.returncode == 0, proc.stderr


def test_site_module_prints_and_installs_the_presets(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("nccl_env: presets/nccl.env\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "nccl.env").write_text("# why\nNCCL_IB_DISABLE=0\n")
    run = [sys.executable, "-m", "hpc_asr.ops.site"]
    proc = subprocess.run([*run, "nccl-env", "--site", str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout == "NCCL_IB_DISABLE=0\n", proc.stderr
    proc = subprocess.run([*run, "install", "--site", str(site), "--dest", str(tmp_path / "p" / "env")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p" / "env" / "presets" / "nccl.env").read_text().endswith("NCCL_IB_DISABLE=0\n")
    assert load_site(tmp_path / "p" / "env" / "site.yaml").nccl_vars() == [("NCCL_IB_DISABLE", "0")]
    (tmp_path / "presets" / "nccl.env").write_text("export NCCL_IB_DISABLE=0\n")  # provision.sh used to take this
    proc = subprocess.run([*run, "nccl-env", "--site", str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    bad = tmp_path / "presets" / "nccl.env"
    assert proc.stderr == f"error: {bad}:1: expected KEY=VALUE, got 'export NCCL_IB_DISABLE=0'\n"
