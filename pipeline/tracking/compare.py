"""`pretrain compare`: one row per run of an experiment, from MLflow, as a table or the UI's compare page."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from pipeline.config import Config, TrackingConfig
from pipeline.errors import ConfigError
from pipeline.tracking.names import (
    METRIC_BITS_PER_BYTE,
    METRIC_MODEL_PARAMS,
    METRIC_TOKENS_PER_S,
    METRIC_TOKENS_SEEN,
    METRIC_TRAIN_LOSS,
    METRIC_VAL_LOSS,
    tracking_uri,
)

COMPARE_COLUMNS = (
    "name",
    "family",
    "params",
    "tokens",
    "train_loss",
    "val_loss",
    "bits_per_byte",
    "tokens_per_s",
    "status",
)
_COLUMN_METRICS = {
    "tokens": METRIC_TOKENS_SEEN,
    "train_loss": METRIC_TRAIN_LOSS,
    "val_loss": METRIC_VAL_LOSS,
    "bits_per_byte": METRIC_BITS_PER_BYTE,
    "tokens_per_s": METRIC_TOKENS_PER_S,
}


def compare_runs(config_or_uri: Config | str, experiment: str | None = None, sort_by: str = "val_loss") -> list[dict]:
    """One row per run of the experiment (COMPARE_COLUMNS plus run_id and experiment_id), sorted by a
    column; `-column` sorts descending; missing values always come last."""
    is_config = isinstance(config_or_uri, Config)
    uri = tracking_uri(config_or_uri) if is_config else config_or_uri
    settings = config_or_uri.tracking if is_config else TrackingConfig()
    experiment = experiment or settings.experiment
    column = sort_by.removeprefix("-")
    if column not in COMPARE_COLUMNS:
        raise ConfigError(f"--sort {sort_by!r}: use one of {', '.join(COMPARE_COLUMNS)} (prefix - to reverse)")
    from pipeline.tracking.store import experiment_runs  # mlflow: only once the arguments are good

    runs = experiment_runs(uri, experiment, settings.request_timeout_s, settings.max_retries)
    rows = [_compare_row(run) for run in runs]
    present = [r for r in rows if r[column] is not None]
    present.sort(key=lambda r: r[column], reverse=sort_by.startswith("-"))
    return present + [r for r in rows if r[column] is None]


def _compare_row(run: Any) -> dict:
    metrics, params = run.data.metrics, run.data.params
    row = {
        "name": run.info.run_name,
        "family": params.get("model.family"),
        "params": metrics.get(METRIC_MODEL_PARAMS, _number(params.get(METRIC_MODEL_PARAMS))),
    }
    row |= {column: metrics.get(name) for column, name in _COLUMN_METRICS.items()}
    row |= {"status": run.info.status, "run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
    return {column: row[column] for column in (*COMPARE_COLUMNS, "run_id", "experiment_id")}


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def format_table(rows: list[dict]) -> str:
    """A plain-text table of compare rows, aligned; missing values show as '-'."""
    cells = [list(COMPARE_COLUMNS)] + [[_format_cell(col, row.get(col)) for col in COMPARE_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COMPARE_COLUMNS))]
    text_columns = {"name", "family", "status"}
    lines = [
        "  ".join(
            cell.ljust(w) if col in text_columns else cell.rjust(w)
            for cell, w, col in zip(line, widths, COMPARE_COLUMNS)
        ).rstrip()
        for line in cells
    ]
    return "\n".join(lines) + "\n"


def _format_cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("params", "tokens"):
        return _human_count(value)
    if column == "tokens_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _human_count(value: float) -> str:
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= divisor:
            return f"{value / divisor:.2f}{suffix}"
    return f"{value:.0f}"


# The UI's model-training view (runs, models, model registry) rather than its GenAI default: the
# `workflowType` query of the route, which the UI also remembers for later visits.
TRAINING_VIEW = "workflowType=machine_learning"


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI page comparing runs (a single-page app: the route is in the fragment)."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}&{TRAINING_VIEW}"


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run's metric charts."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{TRAINING_VIEW}"


def experiments_url(base_url: str) -> str:
    """The MLflow UI's list of experiments, in the model-training view."""
    return f"{base_url.rstrip('/')}/#/experiments?{TRAINING_VIEW}"
