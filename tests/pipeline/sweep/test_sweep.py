"""`pretrain sweep` end to end: real Ray Tune trials, each a real run (Ray Train, 2 DeepSpeed CPU workers,
gloo) nested under the sweep's run in a real sqlite MLflow store.

- a sweep killed mid-trial resumes when the same command is rerun; a trial that fails is recorded, the
  others go on, and the next rerun retries it (the failure: another process holds its run directory);
- ASHA stops a trial whose in-loop validation loss lags: it checkpoints and stops, and is marked stopped;
- in Chromium, a trial's run page and the compare page of the two trials show the loss charts first;
- a 3 x 2 ladder of model sizes and token budgets, two trials at a time, fits a scaling law.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tracking import compare, ui
from pipeline.tracking.journal import read_metrics
from tests.pipeline.conftest import free_port
from tests.pipeline.run.test_orchestrate import PRESET, REPO, TINY, mlflow_run, pretrain
from tests.pipeline.tracking.test_tracking_server import CHROMIUM, CHROMIUM_ARGS, page_text_when

pytestmark = pytest.mark.slow


def overrides(workdir: Path, name: str, *changes: str) -> list[str]:
    """TINY with `changes` replacing the keys they name (a sweep refuses a key given twice)."""
    keys = {change.split("=", 1)[0] for change in changes}
    kept = [item for item in TINY if item.split("=", 1)[0] not in keys]
    return [*kept, f"run.workdir={workdir}", f"run.name={name}", *changes]


def trials_table(workdir: Path, name: str) -> dict[str, dict]:
    table = json.loads((workdir / "sweeps" / name / "trials.json").read_text())
    return {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}


def logged_steps(run_dir: Path, metric: str) -> list[int]:
    return sorted({r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if metric in r["metrics"]})


def kill_when(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """SIGKILL the process's whole session (driver, Ray, trial, workers) once `path` exists."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory):
    """A 2-trial sweep killed mid-trial, rerun while another process holds the second trial's run
    directory, and rerun once more after it let go: (workdir, the three attempts' outputs)."""
    workdir = tmp_path_factory.mktemp("sweep") / "work"
    args = [
        "sweep",
        PRESET,
        *overrides(workdir, "lrs", "train.max_steps=40", "train.log_every=1", "train.lr=1e-3,3e-3"),
    ]
    with open(workdir.parent / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    kill_when(workdir / "runs" / "lrs-lr=1e-3" / "checkpoints" / "latest", process)  # a sealed checkpoint
    held = workdir / "runs" / "lrs-lr=3e-3"
    held.mkdir(parents=True)
    with open(held / "run.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failed = pretrain(*args)
        table_after_failure = trials_table(workdir, "lrs")
    done = pretrain(*args)  # the fix the message gave: the lock is released, the same command again
    return workdir, failed, table_after_failure, done


def test_a_killed_sweep_resumes_and_a_failed_trial_is_retried_by_rerunning(lr_sweep):
    workdir, failed, table_after_failure, done = lr_sweep
    first, second = workdir / "runs" / "lrs-lr=1e-3", workdir / "runs" / "lrs-lr=3e-3"
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "1 of 2 trials failed (lrs-lr=3e-3:" in failed.stderr and "is in use by" in failed.stderr
    assert "Rerun the same command to retry them" in failed.stderr
    assert "trial lrs-lr=3e-3: failed" in failed.stdout
    assert {name: row["status"] for name, row in table_after_failure.items()} == {
        "lrs-lr=1e-3": "done",
        "lrs-lr=3e-3": "failed",
    }
    assert "resumed from" in (first / "logs" / "trial.log").read_text()  # the killed trial was not started over
    assert logged_steps(first, "train/loss") == list(range(1, 41))

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trial lrs-lr=1e-3: done in an earlier attempt, skipped" in done.stdout
    assert "best trial: lrs-lr=" in done.stdout
    table = trials_table(workdir, "lrs")
    assert {row["status"] for row in table.values()} == {"done"}
    assert all(row["val_loss"] > 0 and row["bits_per_byte"] > 0 and row["tokens"] > 0 for row in table.values())

    client, sweep_run = mlflow_run(workdir, workdir / "sweeps" / "lrs")
    assert sweep_run.info.status == "FINISHED" and sweep_run.info.run_name == "lrs"
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id)} >= {"trials.json", "final_loss.png"}
    best = min(table.values(), key=lambda row: row["val_loss"])
    assert sweep_run.data.tags["sweep.best_trial"] == best["trial"]
    assert sweep_run.data.metrics["best/val_loss"] == pytest.approx(best["val_loss"])
    assert sweep_run.data.params["sweep.axes.train.lr"] == "1e-3,3e-3"
    for run_dir in (first, second):
        _, trial_run = mlflow_run(workdir, run_dir)
        assert trial_run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
        assert trial_run.info.status == "FINISHED" and trial_run.info.run_name == run_dir.name
    runs = client.search_runs([sweep_run.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep_run.info.run_id}'")
    assert sorted(run.info.run_name for run in runs) == ["lrs-lr=1e-3", "lrs-lr=3e-3"]  # one run per trial


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_the_trials_run_and_compare_pages_show_the_loss_charts_first(lr_sweep, repo_artifacts_dir):
    """In Chromium, against `mlflow server` on the sweep's store: a trial's run page is in the model-training
    view and its first chart section is train's, with the loss, before val's, and no stage figure has a
    chart; the compare page of the two trials lists train and validation metrics only, train's first."""
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    workdir = lr_sweep[0]
    process, url = ui.start_ui(f"sqlite:///{workdir / 'mlflow.db'}", free_port(), workdir.parent / "server.log")
    try:
        run_ids = [
            mlflow_run(workdir, workdir / "runs" / name)[1].info.run_id for name in ("lrs-lr=1e-3", "lrs-lr=3e-3")
        ]
        experiment_id = MlflowClient(url).get_run(run_ids[0]).info.experiment_id
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(compare.run_url(url, experiment_id, run_ids[0]))
                run_text = page_text_when(page, ["lrs-lr=1e-3 (train/loss)", "Model metrics", "Model registry"])
                page.screenshot(path=str(repo_artifacts_dir / "mlflow-sweep-trial-page.png"), full_page=True)
                page.goto(compare.compare_url(url, experiment_id, run_ids))
                compare_text = page_text_when(page, ["\nMetrics\n", "val/loss", "Artifacts"])
                page.screenshot(path=str(repo_artifacts_dir / "mlflow-compare-sweep-trials.png"), full_page=True)
            finally:
                browser.close()
    finally:
        ui.stop_ui(process)
    charts = re.findall(r"lrs-lr=1e-3 \(([^)]+)\)", run_text)  # each chart's legend: run (metric)
    assert "Model registry" in run_text and "Evaluation runs" not in run_text  # the model-training view
    assert charts and charts[0].startswith("train/") and "train/loss" in charts, run_text[:3000]
    assert run_text.index("lrs-lr=1e-3 (train/loss)") < run_text.index("\nval\n")
    assert not any(chart.split("/")[0] in ("tokenizer", "shard", "eval") for chart in charts)
    listed = compare_text.split("\nMetrics\n", 1)[1].split("\nArtifacts\n", 1)[0]
    metric_names = [line for line in listed.splitlines() if "/" in line]
    assert metric_names and metric_names[0].startswith("train/") and "train/loss" in metric_names, listed
    assert {name.split("/")[0] for name in metric_names} == {"train", "val"}, listed


def test_asha_stops_a_lagging_trial_which_checkpoints_and_is_marked_stopped(tmp_path):
    workdir = tmp_path / "work"
    changes = ["train.max_steps=60", "train.eval_every=5", "train.log_every=1", "train.checkpoint_every=0"]
    done = pretrain(
        "sweep", PRESET, *overrides(workdir, "asha", *changes, "train.lr=1e-2,1e-6"), "--early-stop", "asha"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trial asha-lr=1e-6: stop requested by ASHA" in done.stdout
    table = trials_table(workdir, "asha")
    assert table["asha-lr=1e-2"]["status"] == "done" and table["asha-lr=1e-6"]["status"] == "stopped"
    stopped = workdir / "runs" / "asha-lr=1e-6"
    last_step = logged_steps(stopped, "train/loss")[-1]
    assert 5 <= last_step < 60
    assert (stopped / "checkpoints" / f"step-{last_step:08d}").is_dir()  # the stop wrote a checkpoint
    _, run = mlflow_run(workdir, stopped)
    assert run.info.status == "KILLED" and run.data.tags["sweep.trial_status"] == "stopped"
    assert "sweep.trial_status" not in mlflow_run(workdir, workdir / "runs" / "asha-lr=1e-2")[1].data.tags


def test_a_ladder_of_sizes_and_budgets_fits_a_scaling_law(tmp_path):
    workdir = tmp_path / "work"
    axes = ["model.d_model=32,48,64", "train.max_steps=6,12", "cluster.num_workers=1"]
    done = pretrain(
        "sweep",
        PRESET,
        *overrides(workdir, "ladder", *axes),
        "--max-concurrent",
        "2",
        "--fit",
        "scaling",
        "--budget-flops",
        "1e12",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = trials_table(workdir, "ladder")
    assert len(table) == 6 and {row["status"] for row in table.values()} == {"done"}
    assert len({row["params"] for row in table.values()}) == 3 and len({row["tokens"] for row in table.values()}) == 2
    result = json.loads((workdir / "sweeps" / "ladder" / "scaling_fit.json").read_text())
    fit = result["fit"]
    assert fit["points"] == 6 and fit["alpha"] >= 0 and fit["beta"] >= 0 and fit["E"] > 0
    assert 6 * result["optimal_params"] * result["optimal_tokens"] == pytest.approx(1e12)
    assert "scaling law (6 trials): L = " in done.stdout and "compute-optimal for 1e+12 FLOPs" in done.stdout
    client, sweep_run = mlflow_run(workdir, workdir / "sweeps" / "ladder")
    assert sweep_run.data.metrics["fit/optimal_params"] == pytest.approx(result["optimal_params"])
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id)} >= {"scaling_fit.json", "scaling_fit.png"}
