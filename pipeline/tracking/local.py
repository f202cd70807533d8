"""Tracking without MLflow in the way: where a run is tracked, the journal-only run (tracking off),
the environment tags and how a stage's figures are logged. No mlflow import (that is store.py's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import TrackingError
from pipeline.run.artifacts import atomic_write_text
from pipeline.run.rundir import STAGE_SUMMARY_FILE, TARGET_FILE
from pipeline.tracking.journal import Journal
from pipeline.tracking.names import tracking_uri


@dataclasses.dataclass
class TrackingTarget:
    """Where a run is tracked; saved in the run directory so `sync_run` needs nothing else."""

    uri: str
    experiment: str
    run_name: str
    request_timeout_s: float
    max_retries: int

    @classmethod
    def from_config(cls, config: Config) -> TrackingTarget:
        t = config.tracking
        return cls(tracking_uri(config), t.experiment, config.run.name or "default", t.request_timeout_s, t.max_retries)

    def save(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / TARGET_FILE, json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> TrackingTarget:
        path = run_dir / TARGET_FILE
        if not path.is_file():
            raise TrackingError(
                f"{run_dir}: no {TARGET_FILE}; this run was not tracked with MLflow "
                "(tracking.enabled=false, or not started by `pretrain run`)"
            )
        return cls(**json.loads(path.read_text(encoding="utf-8")))


SUMMARY_COLUMNS = ["stage", "status", "figure", "value"]  # MLflow's table artifact format


class LocalRun(Journal):
    """The driver's run when MLflow tracking is off: the journal only."""

    run_id: str | None = None  # no MLflow run

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params live in config.yaml when nothing is tracked."""

    def syncing(self):
        return nullcontext()

    def finish(self, status: str = "FINISHED") -> None:
        self.close()


def environment_tags(config: Config | None = None) -> dict[str, str]:
    """Host, git commit of the cwd, Ray address and Slurm job id, where there are any."""
    tags = {"host": socket.gethostname()}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    ray_address = os.environ.get("RAY_ADDRESS") or (config.cluster.address if config else None)
    if ray_address:
        tags["ray.address"] = ray_address
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def log_stage(
    tracker: LocalRun, stage: str, figures: Mapping[str, Any], status: str = "done", *, step: int = 0
) -> None:
    """A stage's outcome: the tag `stage.<stage>=<status>`, and its figures as rows of the run's stage
    summary table (the artifact STAGE_SUMMARY_FILE), not as metric charts: a vocabulary size or a shard
    build's driver CPU seconds is one number, no curve, and as a chart it would push the loss curves down
    the run's page. The eval stage's scores are also metrics, under `val/` at the evaluated step, next to
    the in-loop validation's `val/loss`; its own losses (overall and per source) are those same numbers
    by construction, so they are not charted twice (`val/perplexity` is their exponential)."""
    if stage == "eval":
        scores = {
            eval_metric_name(key): value
            for key, value in figures.items()
            if _is_number(value) and not key.endswith("loss")
        }
        if scores:
            tracker.log_metrics(scores, step)
    path = tracker.run_dir / STAGE_SUMMARY_FILE
    table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"columns": SUMMARY_COLUMNS, "data": []}
    rows = [row for row in table["data"] if row[0] != stage]
    rows += [[stage, status, key, value if _is_number(value) else str(value)] for key, value in figures.items()]
    rows += [] if figures else [[stage, status, None, None]]
    atomic_write_text(path, json.dumps({"columns": SUMMARY_COLUMNS, "data": rows}, indent=1) + "\n")
    tracker.log_artifact(path)
    tracker.set_tags({f"stage.{stage}": status})


def eval_metric_name(key: str) -> str:
    """The MLflow name of an eval report metric: `val_loss` -> `val/loss`, `bits_per_byte` ->
    `val/bits_per_byte`, `<source>/loss` -> `val/<source>/loss`; lm-eval scores keep `lm_eval/...`."""
    if key.startswith("lm_eval/"):
        return key
    return "val/" + key.removeprefix("val_")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
