"""Rendered jobs on a real one-node SLURM (tests/slurm_cluster.py): the whole chain, the warning
signal → checkpoint → requeue → resume path, and requests that can never start."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import slurm_cluster as sc
from conftest import ROOT, run_env
from helpers import make_feature_dir

from hpc_asr import checkpoint
from hpc_asr.ops.jobs import JobError, wait

slurm_cluster = sc.slurm_cluster  # the session fixture, by module attribute
tiny_features = helpers.tiny_features

TINY_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 1, "ff_mult": 2, "conv_kernel": 5,
              "subsample_channels": 8, "dropout": 0.0}


def site(tmp_path: Path, cluster: sc.SlurmCluster) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(json.dumps({
        "scheduler": "slurm", "partition": cluster.partition, "node_cpus": cluster.cpus, "cpus_per_task": 1,
        "cpu_ranks_per_node": 2, "cpu_bind": "none", "walltime": "00:30:00", "prep_walltime": "00:10:00",
        "env": {"modules": [], "venv": str(ROOT / ".venv")}, "local_scratch": str(tmp_path / "local")}))
    return p


def jobs_cli(cluster: sc.SlurmCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**run_env(), "SLURM_CONF": str(cluster.conf)}
    return subprocess.run([sys.executable, "-m", "hpc_asr", "jobs", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def tiny_config(path: Path, data: dict[str, Path], out: Path, **train) -> Path:
    cfg = {"data": {"train": str(data["train"]), "dev": str(data["dev"]), "test": str(data["test"]),
                    "max_frames": 4000, "max_utts": 4},
           "specaug": {"enabled": False}, "model": TINY_MODEL,
           "train": {"out_dir": str(out), "epochs": 6, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                     "threads": 1, **train},
           "dist": {"engine": "horovod", "compression": "fp16"}}
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.slow
def test_chain_prep_train_evaluate_export(slurm_cluster, tmp_path):
    corpus = tmp_path / "va"
    synth = subprocess.run([sys.executable, "-m", "hpc_asr", "prep", "voice-assistant", "--out", str(corpus),
                            "--hours", "0.01", "--dev-utts", "4", "--test-utts", "4", "--jobs", "1"],
                           capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=120)
    assert synth.returncode == 0, synth.stderr
    feats = {s: corpus / "fbank" / s for s in ("train", "dev", "test")}
    cfg = tiny_config(tmp_path / "tiny.yaml", feats, tmp_path / "run")
    proc = jobs_cli(slurm_cluster, "submit", "--wait", "--site", str(site(tmp_path, slurm_cluster)),
                    "--nodes", "1", "--gpus-per-node", "0", "--config", str(cfg), "--out", str(tmp_path / "jobs"),
                    "--stage", timeout=400)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((tmp_path / "jobs" / "logs").glob("*")))
    assert proc.returncode == 0, f"{proc.stderr}\n{logs}"
    ids = proc.stdout.split()
    assert len(ids) == 4
    deps = [slurm_cluster.job(i) for i in ids]
    assert all(d["JobState"] == "COMPLETED" for d in deps)

    for split in ("train", "dev", "test"):  # features written by 2 MPI ranks
        n = len((corpus / f"{split}.jsonl").read_text().splitlines())
        index = json.loads((feats[split] / "index.json").read_text())
        assert index["utterances"] == n and index["ranks"] == 2, index
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["ranks"] == 2 and summary["engine"] == "horovod"
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0] * 0.8, losses  # loss fell
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["position"]["step"] == summary["steps"]
    staged = tmp_path / "local" / f"hpc_asr-{ids[1]}" / "train"  # --stage: trained on the node-local copy
    assert state["config"]["data"]["train"] == str(staged)
    assert not staged.parent.exists()  # and removed when the job ended (issue 17.8)
    assert "checkpoint runs" not in logs and f"checkpoint {tmp_path / 'run' / 'best.pt'}" in logs
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    n_test = len((corpus / "test.jsonl").read_text().splitlines())
    assert ev["utterances"] == n_test and 0 <= ev["cer"] and len(ev["hypotheses"]) == n_test
    # the figures are the ones its hypotheses score (2 ranks' counts reduced, not one rank's)
    assert helpers.rescored(tmp_path / "run" / "eval.json") == pytest.approx((ev["wer"], ev["cer"]))
    assert ev["chars"] == sum(len(h["ref"]) for h in ev["hypotheses"].values()) > 0
    assert (tmp_path / "run" / "export" / "model.onnx").is_file()
    assert "srun: error" not in logs and "Traceback" not in logs


def _steps(log: Path) -> list[int]:
    text = log.read_text() if log.is_file() else ""
    return [int(m) for m in re.findall(r" step (\d+)/", text)]


def _until(what: str, pred, timeout: float, cluster: sc.SlurmCluster, job: str, poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}: {cluster.job(job)}\n{cluster.log('slurmctld')[-1500:]}")


def _release_requeued(cluster, jid: str, *updates: str) -> None:
    """A requeued job waits 2 min (Reason=BeginTime) before it is eligible again; shorten that wait
    to 3 s, not to 0. slurmd revokes the job's credentials at the requeue, with a time in whole
    seconds, and refuses any credential of that job id created in the same second: a restart
    within that second ends FAILED ("Killing non-startable batch JobId=…: Job credential
    revoked"; seen in CI when the requeue and `StartTime=now` fell in one second). Slurm's own
    2-minute delay exists for this."""
    cluster.run("scontrol", "update", f"JobId={jid}", *updates, "StartTime=now+3")


@pytest.mark.slow
def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    data = {"train": make_feature_dir(tmp_path / "train", 16, seed=0, shards=2),
            "dev": make_feature_dir(tmp_path / "dev", 2, seed=1, shards=1)}
    data["test"] = data["dev"]
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", data, out, epochs=100, max_steps=60, ckpt_every_steps=20)
    cfg_raw = json.loads(cfg.read_text())
    cfg_raw["data"]["max_utts"] = 1
    cfg.write_text(json.dumps(cfg_raw))
    proc = jobs_cli(slurm_cluster, "render", "--site", str(site(tmp_path, slurm_cluster)), "--nodes", "1",
                    "--gpus-per-node", "0", "--config", str(cfg), "--out", str(tmp_path / "jobs"), "--no-path-check")
    assert proc.returncode == 0, proc.stderr
    jid = slurm_cluster.run("sbatch", "--parsable", str(tmp_path / "jobs" / "train.sbatch")).stdout.strip()
    rank0 = out / "train.rank0.log"
    _until("training to pass step 5", lambda: max(_steps(rank0), default=0) >= 5, 120, slurm_cluster, jid)
    # What --signal=B:USR1@120 does before the time limit: USR1 to the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", jid)
    seen = max(_steps(rank0))
    _until("the requeue", lambda: (lambda j: j.get("Restarts") == "1" and j.get("JobState") == "PENDING")(
        slurm_cluster.job(jid)), 90, slurm_cluster, jid)
    _release_requeued(slurm_cluster, jid)
    _until("the requeued job to finish",
           lambda: slurm_cluster.job(jid).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
           180, slurm_cluster, jid)
    log = (tmp_path / "jobs" / "logs" / f"hpc_asr-train-{jid}.out").read_text()
    assert slurm_cluster.job(jid)["JobState"] == "COMPLETED", log
    assert f"hpc_asr-train {jid} run 0 " in log and f"hpc_asr-train {jid} run 1 " in log  # first run's log kept
    assert "[job] warning signal" in log and "requeueing" in log
    # The scheduler's TERM that ends the requeued run is not forwarded again: a scancel from the
    # dying shell retried through the requeue (KillWait) and could hit the next run's ranks.
    assert log.count("[job] warning signal") == 1, log
    resumed = [int(m) for m in re.findall(r"resumed from \S+: .*?step (\d+)", rank0.read_text())]
    slurmd = slurm_cluster.log("slurmd")[-3000:]
    assert len(resumed) == 1, f"{rank0.read_text()}\n--- job log\n{log}\n--- slurmd\n{slurmd}"
    # The checkpoint was taken at the step boundary after the signal: nothing trained before it is
    # lost (with ckpt_every_steps=20 alone, up to 19 steps would be).
    assert seen <= resumed[0] < 60, (seen, resumed)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 60


@pytest.mark.slow
def test_scancel_stops_training_at_a_checkpoint_without_requeue(slurm_cluster, tmp_path):
    """issue 17.1: a user's scancel (SIGTERM to the batch shell and the ranks) ends the job: the
    ranks checkpoint, the job ends CANCELLED with Restarts=0 and stays ended."""
    data = {"train": make_feature_dir(tmp_path / "train", 16, seed=0, shards=2),
            "dev": make_feature_dir(tmp_path / "dev", 2, seed=1, shards=1)}
    data["test"] = data["dev"]
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", data, out, epochs=100000, max_steps=100000)
    proc = jobs_cli(slurm_cluster, "render", "--site", str(site(tmp_path, slurm_cluster)), "--nodes", "1",
                    "--gpus-per-node", "0", "--config", str(cfg), "--out", str(tmp_path / "jobs"), "--no-path-check")
    assert proc.returncode == 0, proc.stderr
    jid = slurm_cluster.run("sbatch", "--parsable", str(tmp_path / "jobs" / "train.sbatch")).stdout.strip()
    rank0 = out / "train.rank0.log"
    _until("training to pass step 3", lambda: max(_steps(rank0), default=0) >= 3, 120, slurm_cluster, jid)
    slurm_cluster.run("scancel", jid)
    _until("the job to end", lambda: slurm_cluster.job(jid).get("JobState") not in (
        "RUNNING", "PENDING", "REQUEUED", "COMPLETING", "CONFIGURING"), 90, slurm_cluster, jid)
    time.sleep(8)  # a requeue asked by the dying shell would show by now
    job = slurm_cluster.job(jid)
    log = (tmp_path / "jobs" / "logs" / f"hpc_asr-train-{jid}.out").read_text()
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), f"{job}\n{log}"
    assert "requeueing" not in log and "[job] stopped" in log, log
    assert "preempted (signal)" in rank0.read_text(), rank0.read_text()  # checkpointed on the way out
    assert checkpoint.load(out / "last.pt")["position"]["step"] >= 3


@pytest.mark.slow
def test_wait_cancels_the_jobs_a_failed_job_leaves_pending(slurm_cluster, tmp_path):
    """issue 17.7: after a failed job its afterok dependants pend for ever on DependencyNeverSatisfied
    and `submit --wait` hung; now it cancels them and says so."""
    corpus = tmp_path / "va"
    corpus.mkdir()
    for split in ("train", "dev", "test"):
        (corpus / f"{split}.jsonl").write_text('{"id": "x", "audio": "missing.wav", "text": "a"}\n')
    feats = {s: corpus / "fbank" / s for s in ("train", "dev", "test")}
    cfg = tiny_config(tmp_path / "tiny.yaml", feats, tmp_path / "run")
    proc = jobs_cli(slurm_cluster, "submit", "--wait", "--site", str(site(tmp_path, slurm_cluster)),
                    "--gpus-per-node", "0", "--config", str(cfg), "--out", str(tmp_path / "jobs"), timeout=240)
    ids = proc.stdout.split()
    assert proc.returncode == 1 and len(ids) == 4, proc.stderr
    assert f"[jobs] cancelled {ids[1]} (hpc_asr-train), {ids[2]} (hpc_asr-evaluate), {ids[3]} (hpc_asr-export): " \
           f"left pending on DependencyNeverSatisfied after {ids[0]} (hpc_asr-prep) FAILED\n" in proc.stderr
    assert [slurm_cluster.job(i)["JobState"] for i in ids] == ["FAILED"] + ["CANCELLED"] * 3
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""


def test_request_larger_than_the_node_is_refused_not_left_pending(slurm_cluster, tmp_path, monkeypatch):
    s = site(tmp_path, slurm_cluster)
    raw = json.loads(s.read_text())
    raw["node_cpus"] = 0  # staff did not fill it in: render can't check, submit asks sinfo
    s.write_text(json.dumps(raw))
    proc = jobs_cli(slurm_cluster, "submit", "--site", str(s), "--gpus-per-node", "0", "--cpus-per-task", "8",
                    "--out", str(tmp_path / "jobs"), "--no-path-check")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: jobs ask for 16 CPUs per node (cpus-per-task 8) but the largest node "
                                   f"in partition debug has {slurm_cluster.cpus}")
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""
    # A job submitted by hand with the old hard-coded 8 CPUs per task pends for ever; `wait` says why.
    script = tmp_path / "old.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --cpus-per-task=8\n#SBATCH --ntasks-per-node=2\ntrue\n")
    jid = slurm_cluster.run("sbatch", "--parsable", "-o", "/dev/null", str(script)).stdout.strip()
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    time.sleep(3)
    with pytest.raises(JobError, match=rf"job {jid} can never start \(Reason=PartitionConfig\)"):
        wait([jid], poll_s=1, timeout_s=30)
    slurm_cluster.run("scancel", jid)


@pytest.mark.slow
def test_a_task_launch_failure_is_retried_not_reported_as_success(slurm_cluster, tiny_features, tmp_path):
    """The CI failure: a requeued job's step met the PMIx socket its previous run had left in the
    spool dir, every task failed to launch, srun still exited 0 and the job ended COMPLETED without
    training. Here the same leftover is planted for the job's first step before it starts."""
    data = {"train": tiny_features["train"], "dev": tiny_features["dev"], "test": tiny_features["dev"]}
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", data, out, max_steps=2)
    proc = jobs_cli(slurm_cluster, "render", "--site", str(site(tmp_path, slurm_cluster)), "--gpus-per-node", "0",
                    "--config", str(cfg), "--out", str(tmp_path / "jobs"), "--no-path-check")
    assert proc.returncode == 0, proc.stderr
    jid = slurm_cluster.run("sbatch", "--hold", "--parsable", str(tmp_path / "jobs" / "train.sbatch")).stdout.strip()
    stale = slurm_cluster.root / "spool" / f"stepd.slurm.pmix.{jid}.0"
    stale.write_text("")  # what a killed step's PMIx server leaves behind
    slurm_cluster.run("scontrol", "release", jid)
    _until("the job to finish", lambda: slurm_cluster.job(jid).get("JobState") in ("COMPLETED", "FAILED"),
           180, slurm_cluster, jid)
    log = (tmp_path / "jobs" / "logs" / f"hpc_asr-train-{jid}.out").read_text()
    assert "launch failed" in log, log  # the planted leftover did break the first launch
    assert "launching again in 10 s (try 1 of 3)" in log, log
    assert slurm_cluster.job(jid)["JobState"] == "COMPLETED", log
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2, log


@pytest.mark.slow
def test_time_limit_warning_requeues_instead_of_timeout(slurm_cluster, tmp_path):
    """The reported failure: a job at its time limit ended TIMEOUT with Restarts=0. Now SLURM
    itself sends the warning (--signal=B:USR1@90 with --time=00:03:00:
    90 s of training first, so start-up on a busy machine cannot eat the window), the job requeues, resumes."""
    data = {"train": make_feature_dir(tmp_path / "train", 16, seed=0, shards=2),
            "dev": make_feature_dir(tmp_path / "dev", 2, seed=1, shards=1)}
    data["test"] = data["dev"]
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", data, out, epochs=100000, max_steps=100000)
    s = site(tmp_path, slurm_cluster)
    raw = json.loads(s.read_text())
    raw["requeue_signal_s"] = 90
    s.write_text(json.dumps(raw))
    proc = jobs_cli(slurm_cluster, "render", "--site", str(s), "--gpus-per-node", "0", "--config", str(cfg),
                    "--walltime", "00:03:00", "--out", str(tmp_path / "jobs"), "--no-path-check")
    assert proc.returncode == 0, proc.stderr
    jid = slurm_cluster.run("sbatch", "--parsable", str(tmp_path / "jobs" / "train.sbatch")).stdout.strip()
    _until("the time-limit warning and requeue", lambda: (lambda j: j.get("Restarts") == "1" and j.get(
        "JobState") == "PENDING")(slurm_cluster.job(jid)), 270, slurm_cluster, jid, poll=1)
    rank0 = out / "train.rank0.log"
    stopped = [int(m) for m in re.findall(r"preempted \(signal\) at step (\d+)", rank0.read_text())]
    assert len(stopped) == 1 and stopped[0] > 0, rank0.read_text()
    # Let the second run finish: stop after a few more steps, no further time limit in the way.
    _release_requeued(slurm_cluster, jid, "TimeLimit=00:10:00")
    cfg_raw = json.loads(cfg.read_text())
    cfg_raw["train"]["max_steps"] = stopped[0] + 3
    cfg.write_text(json.dumps(cfg_raw))
    _until("the requeued job to finish",
           lambda: slurm_cluster.job(jid).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
           150, slurm_cluster, jid)
    log = (tmp_path / "jobs" / "logs" / f"hpc_asr-train-{jid}.out").read_text()
    assert slurm_cluster.job(jid)["JobState"] == "COMPLETED", log
    resumed = [int(m) for m in re.findall(r"resumed from \S+: .*?step (\d+)", rank0.read_text())]
    assert resumed == [stopped[0]], rank0.read_text()
    assert json.loads((out / "train_summary.json").read_text())["steps"] == stopped[0] + 3


@pytest.mark.slow
def test_torch_engine_rendezvous_at_first_host(slurm_cluster, tiny_features, tmp_path):
    """--dist.engine torch under srun: MASTER_ADDR/PORT come from the job script (first host)."""
    data = {"train": tiny_features["train"], "dev": tiny_features["dev"], "test": tiny_features["dev"]}
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", data, out, max_steps=2)
    proc = jobs_cli(slurm_cluster, "render", "--site", str(site(tmp_path, slurm_cluster)), "--gpus-per-node", "0",
                    "--config", str(cfg), "--out", str(tmp_path / "jobs"), "--no-path-check",
                    "--", "--dist.engine", "torch")
    assert proc.returncode == 0, proc.stderr
    done = slurm_cluster.run("sbatch", "--wait", "--parsable", str(tmp_path / "jobs" / "train.sbatch"),
                             check=False, timeout=240)
    jid = done.stdout.strip()
    log = (tmp_path / "jobs" / "logs" / f"hpc_asr-train-{jid}.out").read_text()
    assert done.returncode == 0, log
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["ranks"], summary["engine"], summary["steps"]) == (2, "torch", 2)
    assert f"MASTER_ADDR={slurm_cluster.node}:" in log and "engine torch" in log


@pytest.mark.slow
def test_serve_job_serves_the_export_and_scancel_drains_it(slurm_cluster, tmp_path):
    """The rendered serve job on a real SLURM node: the service comes up on the asked port, says
    where, answers a real request with the offline Recognizer's transcript, and a scancel ends it
    cleanly (the service drains and exits 0; the job does not requeue)."""
    import httpx
    import serve_model

    from hpc_asr.data.features import load_audio
    from hpc_asr.deploy.recognizer import Recognizer

    model = serve_model.build(serve_model.cache_dir())
    export = Path(model["export"])
    wav, _ = next(iter(model["audio"].values()))
    expected = Recognizer(export)(load_audio(wav, 16000))
    port = sc._free_ports(1)[0]
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(json.dumps({"train": {"out_dir": str(export.parent)}}))  # the chain's run dir: RUN/export
    proc = jobs_cli(slurm_cluster, "render", "--site", str(site(tmp_path, slurm_cluster)), "--gpus-per-node", "0",
                    "--config", str(cfg), "--out", str(tmp_path / "jobs"), "--no-path-check",
                    "--serve-port", str(port), "--serve-walltime", "00:10:00")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "jobs" / "serve.sbatch").read_text()
    assert "--time=00:10:00" in text and f"PORT=${{SERVE_PORT:-{port}}}" in text
    jid = slurm_cluster.run("sbatch", "--parsable", str(tmp_path / "jobs" / "serve.sbatch")).stdout.strip()
    log = tmp_path / "jobs" / "logs" / f"hpc_asr-serve-{jid}.out"
    _until("the service to be ready", lambda: log.is_file() and "[job] serving" in log.read_text(), 180,
           slurm_cluster, jid)
    assert f":{port} (POST /v1/recognize" in log.read_text()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/recognize", content=Path(wav).read_bytes(),
                   headers={"Content-Type": "audio/wav"}, timeout=60)
    assert r.status_code == 200 and r.json()["text"] == expected, r.text
    slurm_cluster.run("scancel", jid)
    _until("the job to end", lambda: slurm_cluster.job(jid).get("JobState") not in (
        "RUNNING", "PENDING", "REQUEUED", "COMPLETING", "CONFIGURING"), 90, slurm_cluster, jid)
    out = log.read_text()
    assert "stop signal" in out and "serve ended with status 0" in out, out
    assert slurm_cluster.job(jid)["Restarts"] == "0"


@pytest.mark.slow
def test_submit_cancels_the_submitted_jobs_when_a_later_submission_fails(slurm_cluster, tmp_path, monkeypatch):
    """issue 19: sbatch refuses the evaluate script; prep and train, already queued, are cancelled
    (not left to run a chain that cannot finish) and the error names the refused command."""
    from hpc_asr.ops.jobs import _parser as jobs_parser
    from hpc_asr.ops.jobs import load_site, make_plan, render, submit

    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    feats = {s: tmp_path / "fbank" / s for s in ("train", "dev", "test")}
    cfg = tiny_config(tmp_path / "tiny.yaml", feats, tmp_path / "run")
    args = jobs_parser().parse_args(["submit", "--site", str(site(tmp_path, slurm_cluster)), "--gpus-per-node", "0",
                                     "--config", str(cfg), "--out", str(tmp_path / "jobs")])
    args.overrides = []
    plan = make_plan(args, load_site(args.site))
    paths = render(plan, tmp_path / "jobs")
    text = paths["evaluate"].read_text().replace("#SBATCH --nodes=1", "#SBATCH --nodes=1\n#SBATCH --no-such-option=1")
    paths["evaluate"].write_text(text)
    before = set(slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split())
    with pytest.raises(JobError, match=r"sbatch .*evaluate\.sbatch failed"):
        submit(plan, paths)
    deadline = time.time() + 30
    while set(slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()) - before:
        assert time.time() < deadline, slurm_cluster.run("squeue").stdout  # prep and train were cancelled
        time.sleep(0.5)


def test_stage_refuses_train_and_dev_with_the_same_directory_name(tmp_path):
    """issue 19: staged copies are named after the source directory: two sources called the same
    would overwrite each other on the node, so render refuses them in one line."""
    feats = {"train": tmp_path / "a" / "fbank", "dev": tmp_path / "b" / "fbank", "test": tmp_path / "b" / "fbank"}
    cfg = tiny_config(tmp_path / "tiny.yaml", feats, tmp_path / "run")
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(json.dumps({"scheduler": "slurm", "walltime": "00:30:00", "prep_walltime": "00:10:00",
                                     "env": {"modules": [], "venv": ""}, "local_scratch": str(tmp_path / "l")}))
    proc = subprocess.run([sys.executable, "-m", "hpc_asr", "jobs", "render", "--site", str(site_yaml), "--stage",
                           "--gpus-per-node", "0", "--config", str(cfg), "--out", str(tmp_path / "jobs"),
                           "--no-path-check"], capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --stage: train and dev directories share the name 'fbank'"]


@pytest.mark.slow
def test_wait_gives_up_after_its_timeout_naming_the_jobs(slurm_cluster, tmp_path, monkeypatch):
    """issue 19: wait(timeout_s) on a job that keeps running fails in one line with its state."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    jid = slurm_cluster.run("sbatch", "--parsable", "-o", "/dev/null", "-D", str(tmp_path),
                            "--wrap", "sleep 60").stdout.strip()
    try:
        t0 = time.time()
        with pytest.raises(JobError, match=rf"jobs {jid} still \{{'{jid}': '(PENDING|RUNNING)'\}} after 3s"):
            wait([jid], poll_s=0.5, timeout_s=3)
        assert time.time() - t0 < 20
    finally:
        slurm_cluster.run("scancel", jid)
