"""The hpc_asr modulefiles, loaded for real under Lmod and under environment-modules (Tcl).

``env/provision.sh`` writes DIR/hpc_asr/VERSION.lua and DIR/hpc_asr/VERSION. Each test loads
them in a fresh bash with `module use DIR && module load hpc_asr`, runs the toolkit from another
directory (``mpirun -np 2 python -m hpc_asr doctor``), and checks that `module unload` gives
back PATH and the variables it changed. A site dependency (``testdep/1.0``, both formats) stands
in for the site's openmpi/cuda modules and must be loaded and unloaded with hpc_asr.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import helpers
import pytest
from conftest import ROOT

tiny_features = helpers.tiny_features

LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
CACHE = Path(os.environ.get("HPC_ASR_CACHE", Path.home() / ".cache" / "hpc_asr"))
MODULECMD_TCL = CACHE / "environment-modules" / "usr" / "lib" / "x86_64-linux-gnu" / "modulecmd.tcl"
VERSION = "0.1.0"


def module_init(system: str) -> str:
    """Bash lines that define `module` for one implementation; fail with the fix if absent."""
    if system == "lmod":
        if not LMOD_INIT.is_file():
            pytest.fail(f"{LMOD_INIT} missing: `make setup` installs lmod")
        return f"source {LMOD_INIT}"
    if not MODULECMD_TCL.is_file() or shutil.which("tclsh") is None:
        pytest.fail(f"{MODULECMD_TCL} or tclsh missing: `make setup` unpacks environment-modules")
    return f'module() {{ eval "$(tclsh {MODULECMD_TCL} bash "$@")"; }}'


def write_site(tmp: Path) -> tuple[Path, Path]:
    deps = tmp / "site-modules" / "testdep"
    deps.mkdir(parents=True)
    (deps / "1.0.lua").write_text('setenv("TESTDEP_LOADED", "1")\n')
    (deps / "1.0").write_text("#%Module1.0\nsetenv TESTDEP_LOADED 1\n")
    site = tmp / "site.yaml"
    site.write_text(f"nccl_env: {ROOT / 'env' / 'nccl.env'}\n"  # presets beside the site file, or named
                    "modulefile:\n  deps: [testdep/1.0]\n  cpu_deps: [testdep/1.0]\n")
    return site, deps.parent


def provision(system: str, deps: Path, *args: str) -> subprocess.CompletedProcess:
    """env/provision.sh run as staff run it: from a login-like shell where `module` works (exported,
    as Lmod and environment-modules do) and the site's module tree is on MODULEPATH."""
    script = f"""
{module_init(system)}
export -f module
module use {deps}
bash {ROOT / "env" / "provision.sh"} {" ".join(args)}
"""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=clean_env(), timeout=900)


def clean_env() -> dict[str, str]:
    """A login-like environment: no venv on PATH, no PYTHONPATH, nothing module-related."""
    venv_bin = str(ROOT / ".venv" / "bin")
    # no duplicate entries: Lmod's path functions collapse them, which is not ours to test
    path = ":".join(dict.fromkeys(p for p in os.environ["PATH"].split(":") if p and p != venv_bin))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LMOD", "MODULE", "_LMFILES_", "LOADEDMODULES", "BASH_FUNC_module", "__LM"))
           and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=path, NCCL_DEBUG="INFO", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.pop("HDF5_USE_FILE_LOCKING", None)
    return env


def load_and_run(system: str, modfiles: Path, deps: Path, workdir: Path, data: Path) -> dict[str, str]:
    script = f"""
{module_init(system)}
module use {deps}
module use {modfiles}
before="$PATH"
module load hpc_asr || {{ echo LOAD_FAILED; exit 9; }}
echo "PY=$(command -v python)"
echo "HDF5=$HDF5_USE_FILE_LOCKING"
echo "SITE=$HPC_ASR_SITE"
echo "NCCL_DEBUG=$NCCL_DEBUG"
echo "PYTHONPATH=${{PYTHONPATH-unset}}"
echo "DEP=${{TESTDEP_LOADED-unset}}"
module help hpc_asr 2>&1 | grep -q "Conformer-CTC" && echo HELP=ok
cd {workdir}
mpirun --oversubscribe --bind-to none -np 2 python -m hpc_asr doctor --data {data} --allreduce-mb 1 \\
  > doctor.out 2>&1
echo "DOCTOR=$?"
module unload hpc_asr
[ "$PATH" = "$before" ] && echo "PATH_RESTORED=yes"
echo "DEP_AFTER=${{TESTDEP_LOADED-unset}}"
echo "HDF5_AFTER=${{HDF5_USE_FILE_LOCKING-unset}}"
echo "NCCL_DEBUG_AFTER=$NCCL_DEBUG"
"""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=clean_env(), cwd=workdir,
                          timeout=180)
    got = dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln)
    got["_out"] = proc.stdout + proc.stderr
    got["_doctor"] = (workdir / "doctor.out").read_text() if (workdir / "doctor.out").is_file() else ""
    return got


def check_loaded(got: dict[str, str], prefix: Path) -> None:
    assert got.get("PY") == str(prefix / "bin" / "python"), got["_out"]
    assert got["HDF5"] == "FALSE" and got["NCCL_DEBUG"] == "WARN" and got["PYTHONPATH"] == "unset"
    assert got["DEP"] == "1" and got.get("HELP") == "ok", got["_out"]
    assert got["SITE"] == str(prefix / "env" / "site.yaml") and Path(got["SITE"]).is_file()  # hpc-asr jobs reads it
    assert got["DOCTOR"] == "0", got["_doctor"]
    assert "PASS  allreduce" in got["_doctor"] and "2 rank(s)" in got["_doctor"]
    # unload gives everything back, the user's own NCCL_DEBUG included
    assert got.get("PATH_RESTORED") == "yes" and got["DEP_AFTER"] == "unset", got["_out"]
    assert got["HDF5_AFTER"] == "unset" and got["NCCL_DEBUG_AFTER"] == "INFO"


@pytest.fixture(scope="module")
def venv_modulefiles(tmp_path_factory) -> tuple[Path, Path]:
    """Modulefiles for the checkout's own .venv (provision.sh --modulefiles-only): fast."""
    tmp = tmp_path_factory.mktemp("modules")
    site, deps = write_site(tmp)
    proc = provision("lmod", deps, "--prefix", str(ROOT / ".venv"), "--modulefiles", str(tmp / "modulefiles"),
                     "--site", str(site), "--modulefiles-only")
    assert proc.returncode == 0, proc.stderr
    assert f"[provision] checked: module load hpc_asr/{VERSION}" in proc.stdout  # its own final check
    assert (tmp / "modulefiles" / "hpc_asr" / f"{VERSION}.lua").is_file()
    assert (tmp / "modulefiles" / "hpc_asr" / VERSION).read_text().startswith("#%Module")
    return tmp / "modulefiles", deps


@pytest.mark.parametrize("system", ["lmod", "tcl"])
def test_module_load_runs_doctor_from_anywhere_and_unloads(system, venv_modulefiles, tiny_features, tmp_path):
    got = load_and_run(system, *venv_modulefiles, tmp_path, tiny_features["train"])
    check_loaded(got, ROOT / ".venv")


@pytest.mark.parametrize("system", ["lmod", "tcl"])
def test_provision_refuses_site_modules_that_do_not_exist(system, tmp_path):
    """The default site.yaml's openmpi/4.1.6 is not on this site: provisioning stops before it
    installs anything, listing every missing module and the line of the site file to edit."""
    _, deps = write_site(tmp_path)
    site = tmp_path / "bad-site.yaml"
    site.write_text("scheduler: slurm\nmodulefile:\n  deps: [testdep/1.0, cuda/12.4]\n"
                    "  cpu_deps: [testdep/1.0, openmpi/4.1.6, nccl/9]\nenv:\n  modules: [gcc/99, hpc_asr]\n")
    prefix = tmp_path / "apps" / "hpc_asr"
    proc = provision(system, deps, "--prefix", str(prefix), "--site", str(site))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "provision: site modules not found (module is-avail): openmpi/4.1.6 nccl/9 gcc/99",
        f"provision: edit {site} line 4 (cpu_deps) to the names `module avail` shows, then re-run",
        f"provision: edit {site} line 6 (modules) to the names `module avail` shows, then re-run"]
    assert not list(prefix.iterdir())  # nothing installed


@pytest.mark.parametrize("system", ["lmod", "tcl"])
def test_provision_fails_when_its_module_does_not_load(system, tmp_path):
    """A dependency that exists but cannot load: provisioning's own `module load hpc_asr` says so."""
    site, deps = write_site(tmp_path)
    (deps / "testdep" / "1.0.lua").write_text('LmodError("testdep is broken on this node")\n')
    (deps / "testdep" / "1.0").write_text('#%Module1.0\nerror "testdep is broken on this node"\n')
    proc = provision(system, deps, "--prefix", str(ROOT / ".venv"), "--modulefiles", str(tmp_path / "mf"),
                     "--site", str(site), "--modulefiles-only")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"provision: `module load hpc_asr/{VERSION}` from {tmp_path / 'mf'} failed:")
    assert "testdep is broken on this node" in proc.stderr


@pytest.mark.slow
def test_provision_self_contained_install(tmp_path, tiny_features):
    """The full staff path: a fresh venv at PREFIX (no link to this checkout), then both module systems."""
    site, deps = write_site(tmp_path)
    prefix = tmp_path / "apps" / "hpc_asr" / VERSION
    proc = provision("lmod", deps, "--prefix", str(prefix), "--site", str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[X] PyTorch" in proc.stdout and "[X] MPI" in proc.stdout  # horovodrun --check-build
    site_packages = next(prefix.glob("lib/python3*/site-packages"))
    assert (site_packages / "hpc_asr" / "ops" / "doctor.py").is_file()  # a copy, not an editable link
    assert not list(site_packages.glob("__editable__*hpc_asr*"))
    for system in ("lmod", "tcl"):
        work = tmp_path / f"work-{system}"
        work.mkdir()
        check_loaded(load_and_run(system, prefix / "modulefiles", deps, work, tiny_features["train"]), prefix)
