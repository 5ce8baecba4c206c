"""hpc_asr.dist.launch: launcher → engine (``auto`` and one-line mismatch errors), collectives on any
dtype, the torch engine's rendezvous and state broadcast, threads from CPU affinity, and the
Horovod knobs and fp16 wire. The launchers are real: ``mpirun -np 2`` and ``torchrun``.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster as sc
import torch
from conftest import ROOT, mpirun_cmd, run, run_env

from hpc_asr.cli import load_config
from hpc_asr.config import ConfigError, DistConfig
from hpc_asr.dist.engines import HorovodKnobs, _join_tensors, _slots, _split_tensors, torch_backend
from hpc_asr.dist.launch import LaunchError, World, compute_threads, detect_launcher, host_address, resolve_engine

slurm_cluster = sc.slurm_cluster  # the session fixture (a real one-node SLURM), by module attribute
PROBE = str(ROOT / "tests" / "mpi_scripts" / "dist_probe.py")
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]
TWO = World(0, 2, 0, 2)


def probes(out: Path) -> list[dict]:
    return [json.loads((out / f"probe.{r}.json").read_text()) for r in (0, 1)]


def states(out: Path) -> list[dict]:
    return [torch.load(out / f"state.{r}.pt", weights_only=True) for r in (0, 1)]


# ---- launcher → engine, without launching --------------------------------------------------

@pytest.mark.parametrize(("env", "launcher"), [
    ({}, "python"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "mpirun"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, "mpirun"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "8"}, "srun"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}, "python"),  # an sbatch script itself
    ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, "horovodrun"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "TORCHELASTIC_RUN_ID": "x"}, "torchrun"),
])
def test_detect_launcher(env, launcher):
    assert detect_launcher(env) == launcher


@pytest.mark.parametrize(("launcher", "size", "have_hvd", "engine"), [
    ("python", 1, True, "none"), ("mpirun", 1, True, "none"), ("torchrun", 2, True, "torch"),
    ("mpirun", 2, True, "horovod"), ("srun", 32, True, "horovod"), ("horovodrun", 2, True, "horovod"),
    ("mpirun", 2, False, "torch"),  # no Horovod installed: torch.distributed still runs under mpirun
])
def test_auto_engine_is_what_the_launcher_implies(launcher, size, have_hvd, engine):
    assert resolve_engine("auto", launcher, World(0, size, 0, size), have_horovod=have_hvd) == engine


@pytest.mark.parametrize(("name", "launcher", "says"), [
    ("horovod", "torchrun", "pass --dist.engine torch"),
    ("none", "mpirun", "pass --dist.engine auto"),
    ("bogus", "python", "dist.engine must be one of"),
])
def test_engine_that_cannot_join_the_world_is_one_line(name, launcher, says):
    with pytest.raises(LaunchError) as e:
        resolve_engine(name, launcher, TWO, have_horovod=True)
    assert says in str(e.value.code) and "\n" not in str(e.value.code)
    assert str(e.value.code).startswith("error: ")
    with pytest.raises(LaunchError) as quiet:  # rank 1 exits 1 without printing a second copy
        resolve_engine(name, launcher, World(1, 2, 1, 2), have_horovod=True)
    assert quiet.value.code == 1


def test_explicit_engines_that_fit_pass():
    assert resolve_engine("torch", "mpirun", TWO, have_horovod=True) == "torch"
    assert resolve_engine("horovod", "srun", TWO, have_horovod=True) == "horovod"
    assert resolve_engine("none", "python", World(), have_horovod=True) == "none"


def test_dist_config_defaults_to_auto_and_validates():
    assert DistConfig().engine == "auto"
    cfg = load_config(None, ["--dist.timeline", "t.json", "--dist.fusion_threshold_mb", "32"])
    assert (cfg.dist.timeline, cfg.dist.fusion_threshold_mb) == ("t.json", 32.0)
    for key, value in [("engine", "mpi"), ("cycle_time_ms", "-1"), ("gradient_predivide_factor", "-2")]:
        with pytest.raises(ConfigError, match=f"dist.{key}"):
            load_config(None, [f"--dist.{key}", value])


# ---- torch backend, rendezvous and state broadcast helpers ---------------------------------

def test_torch_backend_string_takes_cpu_tensors_beside_nccl():
    assert torch_backend(cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert torch_backend(cuda_available=False) == "gloo"


def test_host_address_is_reachable_not_a_short_name():
    addr = host_address()
    resolved = socket.gethostbyname(addr)  # resolves here; an IP or a fully qualified name
    assert not resolved.startswith("127.") or socket.gethostbyname(socket.gethostname()).startswith("127.")
    assert addr != socket.gethostname() or "." in addr


def test_optimizer_state_travels_without_tensors_in_the_pickle():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    tensors: list = []
    skeleton = _split_tensors(opt.state_dict(), tensors)
    assert "Tensor" not in repr(pickle.loads(pickle.dumps(skeleton)))  # no tensor (on rank 0's device) inside
    assert [s.index for s in _slots(skeleton)] == list(range(len(tensors))) and len(tensors) == 3
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.5)
    opt2.load_state_dict(_join_tensors(skeleton, [t.clone() for t in tensors]))
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# ---- threads ------------------------------------------------------------------------------

def test_compute_threads_order_of_precedence():
    cpus = len(os.sched_getaffinity(0))
    assert compute_threads(3, env={"OMP_NUM_THREADS": "5"}) == 3  # the config's explicit value
    assert compute_threads(0, env={"OMP_NUM_THREADS": "5"}) == 5  # then OMP_NUM_THREADS
    assert compute_threads(0, env={"OMP_NUM_THREADS": "4,2"}) == 4
    assert compute_threads(0, env={}) == cpus  # then this process's CPU affinity


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2, reason="needs taskset, 2 CPUs")
def test_threads_follow_taskset_and_omp_num_threads():
    code = "from hpc_asr.dist.launch import compute_threads; import os; print(compute_threads(), os.cpu_count())"

    def threads(*prefix: str, **env: str) -> list[int]:
        e = {k: v for k, v in run_env().items() if k != "OMP_NUM_THREADS"} | env
        out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=e,
                             check=True, timeout=60).stdout
        return [int(x) for x in out.split()]

    assert threads("taskset", "-c", "0") == [1, os.cpu_count()]  # cpu_count() still says all cores
    assert threads("taskset", "-c", "0,1") == [2, os.cpu_count()]
    assert threads("taskset", "-c", "0", OMP_NUM_THREADS="3")[0] == 3


# ---- Horovod knobs -------------------------------------------------------------------------

def test_horovod_knobs_become_environment():
    env = HorovodKnobs(fusion_threshold_mb=2, cycle_time_ms=3.5, hierarchical_allreduce=True,
                       timeline="tl.json").environment(cuda=True)
    assert env == {"HOROVOD_FUSION_THRESHOLD": str(2 * 2**20), "HOROVOD_CYCLE_TIME": "3.5",
                   "HOROVOD_HIERARCHICAL_ALLREDUCE": "1", "HOROVOD_TIMELINE": os.path.abspath("tl.json")}
    cpu = HorovodKnobs().environment(cuda=False)
    assert cpu == {"OMPI_MCA_mpi_yield_when_idle": "1", "HOROVOD_CYCLE_TIME": "5"}


# ---- real launchers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mpirun_auto(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mpirun_auto")
    run(mpirun_cmd(2, PROBE, "auto", str(out), str(out / "timeline.json")), timeout=180)
    return out


def test_mpirun_auto_is_horovod_with_working_collectives(mpirun_auto):
    p = probes(mpirun_auto)
    assert [x["engine"] for x in p] == ["horovod", "horovod"]
    assert [x["world"] for x in p] == [[0, 2, 0, 2], [1, 2, 1, 2]]
    for x in p:
        c = x["collectives"]
        assert c["f64"]["values"] == [3e300, 1 / 3 + (1 / 3 + 1)] and c["f64"]["dtype"] == "torch.float64"
        assert c["bool"]["values"] == [2, 1] and c["i32"]["values"] == [21]
        assert x["gathered"] == [0, 10]
        assert x["threads"] == 1  # 2 CPUs shared by 2 ranks (mpirun --bind-to none)


def test_horovod_fp16_average_of_large_gradients_does_not_overflow(mpirun_auto):
    for x in probes(mpirun_auto):
        assert x["fp16"]["predivide"] == 2.0
        assert x["fp16"]["w1"] == [-40000.0] * 4  # mean of 40000 and 40000, through fp16 on the wire
        assert x["fp16_sum_first"]["w1"] == [float("-inf")] * 4  # summing first in fp16 overflows


def test_torch_engine_fp16_comm_hook_sends_fp16(tmp_path):
    """dist.compression fp16 under the torch engine: gradients are averaged in float16 (a value
    float16 cannot hold comes back rounded), where a plain DDP keeps float32."""
    run(mpirun_cmd(2, str(ROOT / "tests" / "mpi_scripts" / "ddp_fp16_probe.py"), str(tmp_path)), timeout=180)
    for r in (0, 1):
        grads = json.loads((tmp_path / f"fp16.{r}.json").read_text())
        assert grads == {"engine": 1.0, "plain": 1.0 + 2.0**-12}, grads


def test_horovod_timeline_knob_writes_the_timeline(mpirun_auto):
    assert probes(mpirun_auto)[0]["env"]["HOROVOD_TIMELINE"] == str(mpirun_auto / "timeline.json")
    text = (mpirun_auto / "timeline.json").read_text()
    events = json.loads(text)
    assert any(e.get("name") == "ALLREDUCE" for e in events)
    assert '"dtype": "float16"' in text  # the fp16 step's gradient went out compressed


def _assert_broadcast(out: Path) -> None:
    s = states(out)
    for key, value in s[0]["model"].items():
        assert torch.equal(value, s[1]["model"][key]), key
    assert s[0]["opt"]["param_groups"] == s[1]["opt"]["param_groups"]  # lr 0.01 from rank 0, not 0.02
    assert s[1]["opt"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    for pid, st in s[0]["opt"]["state"].items():
        for key, value in st.items():
            theirs = s[1]["opt"]["state"][pid][key]
            assert torch.equal(value, theirs) and value.device == theirs.device, (pid, key)


def test_mpirun_torch_engine_rendezvous_and_broadcast(tmp_path):
    run(mpirun_cmd(2, PROBE, "torch", str(tmp_path)), timeout=180)
    p = probes(tmp_path)
    assert [x["engine"] for x in p] == ["torch", "torch"] and p[0]["backend"] == "gloo"
    addr, port = p[0]["rendezvous"]
    assert p[1]["rendezvous"] == [addr, port] and port > 0
    assert socket.gethostbyname(addr) and addr != socket.gethostname()
    for x in p:
        assert x["collectives"]["f64"]["values"] == [3e300, 1 / 3 + (1 / 3 + 1)]
        assert x["collectives"]["bool"]["values"] == [2, 1] and x["gathered"] == [0, 10]
    _assert_broadcast(tmp_path)


def test_torchrun_auto_is_torch(tmp_path):
    run([*TORCHRUN, PROBE, "auto", str(tmp_path)], timeout=180)
    p = probes(tmp_path)
    assert [x["engine"] for x in p] == ["torch", "torch"] and p[1]["world"] == [1, 2, 1, 2]
    assert p[0]["collectives"]["f64"]["values"] == [3e300, 1 / 3 + (1 / 3 + 1)]
    _assert_broadcast(tmp_path)


def test_torchrun_with_horovod_engine_fails_with_one_line(tmp_path):
    proc = run([*TORCHRUN, PROBE, "horovod", str(tmp_path)], timeout=120, check=False)
    assert proc.returncode != 0 and not list(tmp_path.glob("probe.*"))  # nobody trained as "rank 0 of 1"
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1 and "pass --dist.engine torch" in ours[0], proc.stderr
    assert "hpc_asr/dist/launch.py" not in proc.stderr  # no traceback from our code


def test_mpirun_with_engine_none_fails_with_one_line(tmp_path):
    proc = run(mpirun_cmd(2, PROBE, "none", str(tmp_path)), timeout=120, check=False)
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert ours == ["error: mpirun started 2 ranks but the engine is 'none' (one process): pass --dist.engine "
                    "auto (--engine auto for evaluate), or run it with plain python"], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_horovod_elastic_2_to_1_to_2(tmp_path):
    """horovodrun --min-np 1 --max-np 2 with a discovery script whose answer the job itself
    changes: 2 ranks → 1 → 2, the model and step survive both resets (hvd.elastic.TorchState)."""
    hosts, discover = tmp_path / "hosts", tmp_path / "discover.sh"
    hosts.write_text("localhost:2\n")
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    run([horovodrun, "-np", "2", "--min-np", "1", "--max-np", "2", "--network-interface", "lo",
         "--host-discovery-script", str(discover), sys.executable, str(ROOT / "tests" / "mpi_scripts" /
         "dist_elastic.py"), str(tmp_path)], timeout=170)
    rows = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    steps, sizes, weights = [int(r[0]) for r in rows], [int(r[1]) for r in rows], [float(r[2]) for r in rows]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2
    shrink, grow = sizes.index(1), len(sizes) - sizes[::-1].index(1)
    assert all(s == 1 for s in sizes[shrink:grow]) and all(s == 2 for s in sizes[grow:])  # 2 → 1 → 2
    assert steps[-1] == 24 and steps[shrink] == steps[shrink - 1] + 1  # no step lost or repeated
    # Rank r feeds inputs r + 1: a step moves the weight sum by -lr * 4 * (mean of r + 1 over the
    # ranks of that step) * 2 rows = -0.4 * (size + 1); a rank that restarted from scratch, or a
    # gradient not averaged over the current ranks, breaks the line.
    deltas = [(b - a, n) for (a, b), n in zip(itertools.pairwise(weights), sizes[1:])]
    assert all(abs(d + 0.4 * (n + 1)) < 1e-4 for d, n in deltas), deltas
    # After the grow both ranks hold the same weights at every step (the new one got rank 0's)
    mine = {r: {int(s): w for s, n, w in (ln.split() for ln in (tmp_path / f"log.{r}").read_text().splitlines())
                if int(s) > steps[grow - 1]} for r in (0, 1)}
    assert sorted(mine[0]) == sorted(mine[1]) == steps[grow:] and mine[0] == mine[1], mine


def test_world_inside_sbatch_and_srun(slurm_cluster, tmp_path):
    """On a real SLURM: the batch script itself is one process (it has SLURM_PROCID=0 and
    SLURM_NTASKS=2 all the same), ``srun`` inside it starts the 2-rank world."""
    code = ("from hpc_asr.dist.launch import detect_launcher, detect_world; w = detect_world(); "
            "print(detect_launcher(), w.rank, w.size, w.local_size)")
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nexport PYTHONPATH={ROOT}\n{sys.executable} -c '{code}' > {tmp_path}/batch.txt\n"
                      f"srun -n 2 bash -c \"{sys.executable} -c '{code}' > {tmp_path}/step.\\$SLURM_PROCID.txt\"\n"
                      f"touch {tmp_path}/done\n")
    slurm_cluster.run("sbatch", "-n", "2", "-o", str(tmp_path / "job.out"), str(script))
    deadline = time.time() + 120
    while not (tmp_path / "done").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert (tmp_path / "done").exists(), (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert (tmp_path / "batch.txt").read_text().split() == ["python", "0", "1", "1"]
    assert sorted((tmp_path / f"step.{r}.txt").read_text().split()[1] for r in (0, 1)) == ["0", "1"]
    assert (tmp_path / "step.1.txt").read_text().split() == ["srun", "1", "2", "2"]


# ---- BatchNorm statistics: each rank its own, averaged at checkpoints, the same on both engines ----

@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_batchnorm_statistics_are_the_mean_of_the_ranks_on_both_engines(tmp_path, engine):
    """Ranks see different data (means 0 and 10): each keeps the statistics of its own batches
    (DDP must not broadcast rank 0's buffers before every forward), and the average over ranks is
    their mean, not rank 0's statistics, identically under Horovod (mpirun) and DDP (torchrun)."""
    script = str(ROOT / "tests" / "mpi_scripts" / "bn_average.py")
    cmd = mpirun_cmd(2, script, engine, str(tmp_path)) if engine == "horovod" else [*TORCHRUN, script, engine,
                                                                                   str(tmp_path)]
    run(cmd, timeout=180)
    res = [torch.load(tmp_path / f"bn.{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ("mean", "var"):
        ref = [r["reference"][key] for r in res]
        assert (ref[1] - ref[0]).abs().min() > 0.5  # the ranks' statistics really differ
        for r in res:  # each rank's own statistics: its own batches only
            torch.testing.assert_close(r["own"][key], r["reference"][key], rtol=1e-5, atol=1e-5)
        mean = (ref[0] + ref[1]) / 2
        for r in res:
            torch.testing.assert_close(r["averaged"][key], mean, rtol=1e-5, atol=1e-5)
