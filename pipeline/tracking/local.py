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
from pipeline.run.rundir import TARGET_FILE
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


class LocalRun(Journal):
    """The driver's run when MLflow tracking is off: the journal only."""

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
    """A stage's figures: numbers as metrics `<stage>/<key>` at `step`, the rest as params; tag
    `stage.<stage>=<status>`. Keys that already hold a '/' are used as they are."""
    named = {key if "/" in key else f"{stage}/{key}": value for key, value in figures.items()}
    numbers = {k: v for k, v in named.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    others = {k: v for k, v in named.items() if k not in numbers}
    if numbers:
        tracker.log_metrics(numbers, step)
    if others:
        tracker.log_params(others)
    tracker.set_tags({f"stage.{stage}": status})
