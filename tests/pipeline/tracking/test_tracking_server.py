"""Tracking against a real `mlflow server` on 127.0.0.1: the compare page in Chromium, and a server
killed in the middle of a run."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.tracking import compare, local, names, store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_mlflow_request_env")]

CHROMIUM = Path("/usr/bin/chromium")
# The headless flags measured to work here (NOTES-infra): no sandbox as root, no GPU, no background traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def open_run(tmp_path: Path, url: str, name: str, *overrides: str) -> local.LocalRun:
    config = load_config(
        None,
        [
            f"run.name={name}",
            f"run.workdir={tmp_path}",
            f"tracking.uri={url}",
            "tracking.experiment=server-tests",
            *overrides,
        ],
    )
    return store.open_tracker(config, tmp_path / "runs" / name)


def page_text_when(page, wanted: list[str], timeout_s: float = 90) -> str:
    """The page's text once every wanted string is in it (the UI renders asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = page.inner_text("body")
        if all(w in text for w in wanted) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def compare_page_columns(text: str, metric: str) -> dict[str, float]:
    """{run name: value of `metric`} read from the compare page's text.

    The page prints the run names of the 'Run Name:' row in column order, and after 'Metrics' the metric
    names followed by their values, row by row in the same column order. With one metric per run, the
    values right after its name are that metric's, one per column.
    """
    names_part = text.split("Run Name:", 1)[1].split("Start Time:", 1)[0]
    names = [line.strip() for line in names_part.splitlines() if line.strip()]
    metric_lines = [line.strip() for line in text.split("\nMetrics\n", 1)[1].splitlines() if line.strip()]
    after = metric_lines[metric_lines.index(metric) + 1 :]
    values = [float(line) for line in after if NUMBER.fullmatch(line)][: len(names)]
    return dict(zip(names, values))


@pytest.mark.browser
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (scripts/system-deps.sh installs it)"
)
def test_compare_page_shows_both_runs_and_their_val_loss(tmp_path, mlflow_server, repo_artifacts_dir):
    from playwright.sync_api import sync_playwright

    _, url = mlflow_server()
    val_losses = {"tiny-gpt": 2.375, "tiny-bert": 3.125}  # exact in the page's 3-decimal display
    run_ids = []
    for name, val_loss in val_losses.items():
        tracker = open_run(tmp_path, url, name)
        tracker.log_params({"model": {"family": name.split("-")[1]}})
        tracker.log_metrics({names.METRIC_VAL_LOSS: val_loss}, step=10)
        tracker.finish()
        run_ids.append(tracker.run_id)

    rows = compare.compare_runs(url, "server-tests")
    assert {r["name"]: r["val_loss"] for r in rows} == val_losses
    page_url = compare.compare_url(url, rows[0]["experiment_id"], run_ids)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(page_url)
            text = page_text_when(page, [*val_losses, "\nMetrics\n", names.METRIC_VAL_LOSS])
            page.screenshot(path=str(repo_artifacts_dir / "mlflow-compare-runs.png"), full_page=True)
        finally:
            browser.close()
    assert compare_page_columns(text, names.METRIC_VAL_LOSS) == val_losses, text[-3000:]


def test_run_keeps_every_metric_step_when_the_server_dies_and_returns(tmp_path, mlflow_server, caplog):
    server, url = mlflow_server()
    tracker = open_run(tmp_path, url, "killed", "tracking.request_timeout_s=2", "tracking.max_retries=0")
    tracker.retry_interval_s = 0  # retry on every call, so recovery shows without waiting a minute
    for step in range(10):
        tracker.log_metrics({names.METRIC_TRAIN_LOSS: 10.0 - step * 0.1}, step=step)

    os.killpg(server.pid, signal.SIGKILL)  # a crash, not a clean shutdown
    server.wait()
    started = time.monotonic()
    for step in range(10, 20):
        tracker.log_metrics({names.METRIC_TRAIN_LOSS: 10.0 - step * 0.1}, step=step)
    assert time.monotonic() - started < 30, "training was held up by the dead server"

    mlflow_server(port=int(url.rsplit(":", 1)[1]))  # the same store, back on the same address
    for step in range(20, 30):
        tracker.log_metrics({names.METRIC_TRAIN_LOSS: 10.0 - step * 0.1}, step=step)

    client = MlflowClient(url)
    history = client.get_metric_history(tracker.run_id, names.METRIC_TRAIN_LOSS)
    assert sorted(m.step for m in history) == list(range(30))  # every step, none twice
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("pipeline.tracking") and r.levelno >= 30]
    assert len(warnings) == 2 and "reachable again" in warnings[1]
    tracker.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert store.sync_run(tmp_path / "runs" / "killed") == 0
