"""`pretrain submit` against a real private Slurm cluster (two slurmd on this host, see conftest.py) running
the real `pretrain run` of a tiny GPT: one node, two nodes forming one Ray cluster, preemption with
requeue and exact resume, and a sweep as a job array. The runs share one workdir, so the tokenizer and
shards are built once and reused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EXPERIMENT = "slurm-test"
# Steps take 0.05-0.7 s here and the warning reaches the pipeline 1-3 s after `scancel`: the preemption test
# signals after step WARN_AT, and STEPS leaves a margin of well over 3 s of training after it.
STEPS, WARN_AT = 150, 8
TINY = {
    "data": {"max_documents": 120, "val_permille": 100, "shard_tokens": 65536, "num_workers": 1},
    "tokenizer": {"vocab_size": 512, "sample_bytes": 1_000_000},
    "model": {"family": "gpt", "max_seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 2},
    "train": {
        "micro_batch_size": 4,
        "grad_accum_steps": 1,
        "max_steps": STEPS,
        "warmup_steps": 3,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint_every": 0,
        "zero_stage": 1,
    },
    "eval": {"max_windows": 16, "max_new_tokens": 8},
    "tracking": {"experiment": EXPERIMENT},
}
SHORT = ["train.max_steps=10"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def workspace(slurm_cluster, tmp_path_factory):
    """The submit directory: tiny.yaml and a site file (2 CPUs per node, a short Ray temp dir: unix socket
    paths are limited to 107 bytes). Removes the Ray temp dirs afterwards."""
    root = tmp_path_factory.mktemp("submit")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (root / "site.yaml").write_text(
        yaml.safe_dump(
            {
                "cpus_per_task": 2,
                "time": "00:30:00",
                "python": sys.executable,
                "ray_tmpdir": f"{ray_tmp}/$SLURM_JOB_ID",
                "object_store_bytes": 100_000_000,
                "ray_start_timeout_s": 180,
                "signal_seconds": 0,
            }
        )
    )
    yield root
    shutil.rmtree(ray_tmp, ignore_errors=True)


def submit(cluster, workspace: Path, *args: str) -> str:
    """`pretrain submit tiny.yaml ARGS --site site.yaml`; returns the job id it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", "submit", "tiny.yaml", *args, "--site", "site.yaml"],
        cwd=workspace,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted (?:array )?job (\d+)", done.stdout).group(1)


def wait_for_job(cluster, slurm_id: str, log: Path, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_fields(cluster, slurm_id)
        if state.get("JobState") in FINAL_STATES:
            assert state["JobState"] == "COMPLETED", f"job {slurm_id} {state['JobState']}:\n{log_tail(log)}"
            return state
        time.sleep(2)
    cluster.scontrol("cancel", slurm_id)
    raise AssertionError(f"job {slurm_id} not done within {timeout_s} s:\n{log_tail(log)}")


def job_fields(cluster, slurm_id: str) -> dict[str, str]:
    out = cluster.scontrol("show", "job", "-o", slurm_id).stdout.strip().splitlines()
    return dict(field.split("=", 1) for field in out[0].split() if "=" in field) if out else {}


def log_tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else f"(no {log})"


def run_dir(workspace: Path, name: str) -> Path:
    return workspace / "work" / "runs" / name


def logged_losses(run: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl; steps logged twice (after a resume) must agree."""
    losses: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record["metrics"]:
            step, loss = record["step"], record["metrics"]["train/loss"]
            assert losses.setdefault(step, loss) == loss, f"step {step} logged as {losses[step]} and {loss}"
    return losses


def mlflow_runs(workspace: Path, name_prefix: str) -> list:
    client = MlflowClient(f"sqlite:///{workspace / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [run for run in runs if run.info.run_name.startswith(name_prefix)]


def mlflow_losses(workspace: Path, run) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{workspace / 'work' / 'mlflow.db'}")
    losses: dict[int, float] = {}
    for metric in client.get_metric_history(run.info.run_id, "train/loss"):
        assert losses.setdefault(metric.step, metric.value) == metric.value
    return losses


@pytest.fixture(scope="module")
def one_node_run(slurm_cluster, workspace) -> Path:
    """An uninterrupted one-node run: the first test's subject and the preemption test's reference."""
    job = submit(slurm_cluster, workspace, "run.name=one")
    wait_for_job(slurm_cluster, job, run_dir(workspace, "one") / "slurm" / f"{job}.out")
    return run_dir(workspace, "one")


def test_one_node_submit_completes_with_a_complete_mlflow_run(slurm_cluster, workspace, one_node_run):
    stages = json.loads((one_node_run / "run.json").read_text())["stages"]
    assert {name: entry["status"] for name, entry in stages.items()} == {
        "tokenizer": "done",
        "shard": "done",
        "train": "done",
        "eval": "done",
    }
    assert sorted(logged_losses(one_node_run)) == list(range(1, STEPS + 1))
    [run] = mlflow_runs(workspace, "one")
    assert run.info.status == "FINISHED" and sorted(mlflow_losses(workspace, run)) == list(range(1, STEPS + 1))
    assert run.data.tags.get("slurm.job_id") and "val/bits_per_byte" in run.data.metrics
    status = subprocess.run(
        [sys.executable, "-m", "launch.cli", "status", str(one_node_run)],
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "stages     tokenizer done" in status.stdout and "COMPLETED, restarts 0" in status.stdout
    assert f"run {run.info.run_id}" in status.stdout


def test_two_nodes_form_one_ray_cluster_with_a_worker_per_node(slurm_cluster, workspace):
    job = submit(slurm_cluster, workspace, "run.name=two", *SHORT, "--nodes", "2")
    run = run_dir(workspace, "two")
    wait_for_job(slurm_cluster, job, run / "slurm" / f"{job}.out")
    assert re.search(r"Ray cluster ready at \S+: 2 nodes, 4 CPUs, 0 GPUs", (run / "slurm" / f"{job}.out").read_text())
    summary = json.loads((run / "slurm" / f"ray-{job}.json").read_text())
    nodes = {node["node_id"] for node in summary["nodes"] if node["alive"]}
    workers = [worker["node_id"] for worker in summary["train_workers"]]
    assert len(nodes) == 2 and sorted(workers) == sorted(nodes)  # one training worker on each node
    assert sorted(logged_losses(run)) == list(range(1, 11))


def test_preemption_requeues_and_resumes_with_the_uninterrupted_losses(slurm_cluster, workspace, one_node_run):
    job = submit(slurm_cluster, workspace, "run.name=preempted")
    run = run_dir(workspace, "preempted")
    log = run / "slurm" / f"{job}.out"
    wait_for_logged_steps(run / "metrics.jsonl", steps=WARN_AT, log=log)
    warned = subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job], env=slurm_cluster.env, capture_output=True, text=True, timeout=60
    )
    assert warned.returncode == 0, warned.stderr
    state = wait_for_job(slurm_cluster, job, log)
    text = log.read_text()
    assert state["Restarts"] == "1", log_tail(log)
    assert "warning signal" in text and "requeueing" in text and f"[job {job}] restart 1" in text
    resumed = int(re.search(r"resumed from \S+/step-(\d+)", text).group(1))
    assert WARN_AT <= resumed < STEPS  # resumed from the checkpoint the warning asked for, mid-training
    reference = logged_losses(one_node_run)
    assert logged_losses(run) == reference
    [mlflow_run] = mlflow_runs(workspace, "preempted")
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_losses(workspace, mlflow_run) == reference


def wait_for_logged_steps(metrics: Path, steps: int, log: Path, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"train/loss"') >= steps:
            return
        time.sleep(0.5)
    raise AssertionError(f"{metrics}: fewer than {steps} steps within {timeout_s} s:\n{log_tail(log)}")


def test_a_sweep_of_two_combinations_runs_as_an_array_with_two_mlflow_runs(slurm_cluster, workspace):
    job = submit(slurm_cluster, workspace, "run.name=sweep", *SHORT, "--sweep", "train.lr=1e-3,2e-3")
    names = ["sweep-lr=1e-3", "sweep-lr=2e-3"]
    for task, name in enumerate(names):
        jobs = json.loads((run_dir(workspace, name) / "slurm" / "jobs.json").read_text())
        assert jobs[-1]["slurm_id"] == f"{job}_{task}"
        wait_for_job(slurm_cluster, f"{job}_{task}", Path(jobs[-1]["log"]))
    runs = mlflow_runs(workspace, "sweep-")
    assert sorted(run.info.run_name for run in runs) == names
    assert all(run.info.status == "FINISHED" for run in runs)
    [parent] = [run for run in mlflow_runs(workspace, "sweep") if run.info.run_name == "sweep"]
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in runs)  # nested, as `pretrain sweep`
    assert parent.data.tags["slurm.array_job_id"] == job and parent.data.params["sweep.axes.train.lr"] == "1e-3,2e-3"
    assert sorted(float(run.data.params["train.lr"]) for run in runs) == [1e-3, 2e-3]
