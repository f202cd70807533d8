"""MLflow tracking: the only module that imports mlflow.

One MLflow run per pipeline run, created by global rank 0 only; its id lives in `<run_dir>/mlflow_run_id`
so a resumed or requeued job logs into the same run. Other ranks get a no-op `Tracker`.

Durability: a tracking outage never stops training and loses nothing.
- Every `log_metrics` call first appends one JSON line to `<run_dir>/metrics.jsonl` (the local record:
  `{"step": int, "time_ms": int, "metrics": {name: float}}`), then sends what MLflow has not got yet.
  `<run_dir>/metrics.synced` holds the byte offset in metrics.jsonl up to which MLflow has the metrics.
- Params, tags, artifacts and status changes are appended to `<run_dir>/mlflow_ops.jsonl`, with the
  same kind of watermark in `<run_dir>/mlflow_ops.synced`. Both logs are append-only, so two processes
  of one run (the driver and the rank-0 training worker) never lose each other's records.
- Requests are bounded (tracking.request_timeout_s, tracking.max_retries). After a failure: one warning,
  then a new attempt at most every `RETRY_INTERVAL_S` seconds and in `finish()`; `sync_run(run_dir)`
  (`pretrain sync RUN_DIR`) sends whatever is left. A resent batch carries its original timestamps,
  which MLflow deduplicates, so a batch whose reply was lost is never stored twice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import quote

from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (MAX_ENTITY_KEY_LENGTH, MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH,
                                     MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH)

from pipeline.artifacts import atomic_write_text
from pipeline.config import Config, TrackingConfig

log = logging.getLogger(__name__)

# Metric names shared by training, evaluation and `compare`.
METRIC_TRAIN_LOSS = "train/loss"
METRIC_VAL_LOSS = "val/loss"
METRIC_BITS_PER_BYTE = "eval/bits_per_byte"
METRIC_TOKENS_PER_S = "train/tokens_per_s"
METRIC_TOKENS_SEEN = "train/tokens_seen"
METRIC_MODEL_PARAMS = "model/params"  # a metric or a param

RUN_ID_FILE = "mlflow_run_id"
TARGET_FILE = "mlflow_target.json"
OPS_FILE = "mlflow_ops.jsonl"
OPS_SYNCED_FILE = "mlflow_ops.synced"
METRICS_FILE = "metrics.jsonl"
SYNCED_FILE = "metrics.synced"

RETRY_INTERVAL_S = 60.0
TRUNCATION_MARK = "...[truncated]"
REDACTED = "<redacted>"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow refuses more than 10 retries per request.
MLFLOW_MAX_RETRIES_LIMIT = 10
# Errors that mean MLflow will never accept this request; anything else is an outage worth retrying.
REJECTION_CODES = {"INVALID_PARAMETER_VALUE", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}

_SECRET_KEY = re.compile(r"(^|[._/-])(password|passwd|secret|token|api_?key|access_?key|private_?key|"
                         r"credentials?|auth)([._/-]|$)", re.IGNORECASE)
_SECRET_VALUES = [
    re.compile(r"(?<=://)[^/@\s]+(?=@)"),  # user:password@ in URLs
    re.compile(r"\b(hf|gh[pousr]|github_pat|glpat|xox[abprs])[_-][A-Za-z0-9_-]{16,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
]
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")


class TrackingError(RuntimeError):
    """A tracking problem phrased for the user (sync or compare could not reach the store)."""


# ---------------------------------------------------------------------------------------------
# Names, values and secrets


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists -> {"a.b.0.c": "value"} (the dot-path override syntax)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and value:
            flat.update(flatten_params({str(i): item for i, item in enumerate(value)}, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (Mapping, list, tuple)) else str(value)
    return flat


def redact(key: str, value: str) -> str:
    """The value with anything secret-looking replaced; all of it when the key names a secret."""
    if _SECRET_KEY.search(key):
        return REDACTED
    for pattern in _SECRET_VALUES:
        value = pattern.sub(REDACTED, value)
    return value


def safe_name(name: str) -> str:
    """A param/metric/tag name MLflow accepts: allowed characters, no path tricks, at most 250 chars."""
    name = _INVALID_NAME_CHARS.sub("_", name)
    normal = posixpath.normpath(name)
    # MLflow refuses names that would resolve to another path or leave the run's directory.
    if normal != name or normal == "." or normal.startswith(("..", "/")):
        name = "_" + name.replace("/", "_")
    if len(name) > MAX_ENTITY_KEY_LENGTH:  # keep long names distinct with a hash of the full name
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_ENTITY_KEY_LENGTH - 9]}-{digest}"
    return name


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _clean(items: Mapping[str, Any], value_limit: int) -> dict[str, str]:
    return {safe_name(k): _truncate(redact(k, str(v)), value_limit) for k, v in items.items()}


def _is_rejection(exc: Exception) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code in REJECTION_CODES


def _hide_credentials(uri: str) -> str:
    return redact("uri", uri)


def _describe(exc: Exception) -> str:
    """The first line of an error, short, without credentials (MLflow's messages quote the URL)."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    return _hide_credentials(lines[0][:300])


# ---------------------------------------------------------------------------------------------
# Small file helpers


def _read_text(path: Path) -> str | None:
    """The stripped content of a small file; None when it is missing or empty."""
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def _read_offset(watermark: Path) -> int:
    return int(_read_text(watermark) or 0)


def _jsonl_records(path: Path, offset: int = 0) -> Iterator[tuple[int, dict]]:
    """(end offset, record) for each complete line from `offset`; a torn or corrupt line is skipped."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):  # still being written, or cut by a crash
                return
            offset += len(line)
            try:
                yield offset, json.loads(line)
            except ValueError:
                log.warning("%s: skipping a corrupt line ending at byte %d", path, offset)


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl, oldest first."""
    return [record for _, record in _jsonl_records(Path(metrics_jsonl))]


# ---------------------------------------------------------------------------------------------
# Trackers


class Tracker:
    """The tracking interface; this base class does nothing (ranks other than 0)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) mapping or pydantic model, flattened to dot paths."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metric values at `step`."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a directory."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (mutable, unlike params)."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""


class LocalTracker(Tracker):
    """Keeps the local metric record only (rank 0 with tracking disabled)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._metrics_file = open(self.metrics_path, "ab")
        if self._metrics_file.tell() and not _ends_with_newline(self.metrics_path):
            self._metrics_file.write(b"\n")  # terminate a line torn by a crash so the next one parses

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {safe_name(k): float(v) for k, v in metrics.items()}
        names = list(values)
        time_ms = int(time.time() * 1000)
        # One record never exceeds one MLflow batch.
        for start in range(0, len(names), MAX_METRICS_PER_BATCH):
            chunk = {k: values[k] for k in names[start:start + MAX_METRICS_PER_BATCH]}
            record = {"step": int(step), "time_ms": time_ms, "metrics": chunk}
            self._metrics_file.write(json.dumps(record).encode() + b"\n")
        self._metrics_file.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self.close()

    def close(self) -> None:
        """Close the local record without ending the run."""
        self._metrics_file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


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
        return cls(tracking_uri(config), t.experiment, config.run.name or "default", t.request_timeout_s,
                   t.max_retries)

    def save(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / TARGET_FILE, json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> TrackingTarget:
        path = run_dir / TARGET_FILE
        if not path.is_file():
            raise TrackingError(f"{run_dir}: no {TARGET_FILE}; this run was not tracked with MLflow "
                                "(tracking.enabled=false, or not started by `pretrain run`)")
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def tracking_uri(config: Config) -> str:
    """tracking.uri, or the sqlite store `<workdir>/mlflow.db`."""
    if config.tracking.uri:
        return config.tracking.uri
    return f"sqlite:///{Path(config.run.workdir).resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _bound_requests(timeout_s: float, max_retries: int) -> None:
    """MLflow reads these per request; its defaults block about 4 minutes per call on a dead server."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))  # MLflow parses an int
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(min(max_retries, MLFLOW_MAX_RETRIES_LIMIT))


class MlflowTracker(LocalTracker):
    """Rank 0: the local record plus MLflow, with the outage handling described at the top."""

    retry_interval_s = RETRY_INTERVAL_S

    def __init__(self, run_dir: Path, target: TrackingTarget):
        super().__init__(run_dir)
        self.target = target
        _bound_requests(target.request_timeout_s, target.max_retries)
        self._client = MlflowClient(target.uri)
        self.run_id = _read_text(self.run_dir / RUN_ID_FILE)
        self._run_checked = False
        self._retry_at = 0.0  # time.monotonic() before which no request is tried after a failure
        self._in_outage = False

    # -- the public interface: record locally first, then try to send

    def log_params(self, params: Mapping[str, Any]) -> None:
        plain = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
        self._queue({"op": "params", "params": flatten_params(plain)})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._queue({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._queue({"op": "tags", "tags": dict(tags)})

    def finish(self, status: str = "FINISHED") -> None:
        status = status.upper()
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish(status={status!r}): use one of {', '.join(TERMINAL_STATUSES)}")
        self._queue({"op": "status", "status": status}, flush=False)
        self._flush(force=True)
        if self._in_outage:
            log.warning("MLflow tracking: %s still holds data MLflow has not got; send it with "
                        "`pretrain sync %s` once %s is reachable", self.run_dir, self.run_dir,
                        _hide_credentials(self.target.uri))
        self.close()

    # -- sending

    def _queue(self, op: dict, *, flush: bool = True) -> None:
        with open(self.run_dir / OPS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(op) + "\n")
        if flush:
            self._flush()

    def _flush(self, *, force: bool = False) -> None:
        """Send everything pending unless a recent failure says to wait; never raises."""
        if not force and time.monotonic() < self._retry_at:
            return
        try:
            sent = self.push()
        except Exception as exc:  # any failure of the store is an outage: training must go on
            self._retry_at = time.monotonic() + self.retry_interval_s
            if not self._in_outage:
                log.warning("MLflow tracking at %s failed (%s); training continues, metrics are kept in %s "
                            "and resent every %.0f s", _hide_credentials(self.target.uri),
                            _describe(exc), self.metrics_path, self.retry_interval_s)
            self._in_outage = True
            return
        if self._in_outage:
            log.warning("MLflow tracking at %s is reachable again; sent %d metric values kept locally",
                        _hide_credentials(self.target.uri), sent)
        self._in_outage = False

    def push(self) -> int:
        """Make sure the run exists, send pending operations, then metrics; returns metric values sent."""
        self._ensure_run()
        self._replay_ops()
        return self._push_metrics()

    def _ensure_run(self) -> None:
        if self._run_checked:
            return
        if self.run_id is not None:
            try:
                self._client.get_run(self.run_id)
                self._run_checked = True
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s is not in %s; creating a new run and sending the whole local "
                            "record to it", self.run_id, _hide_credentials(self.target.uri))
        run = self._client.create_run(self._experiment_id(), run_name=self.target.run_name)
        self.run_id = run.info.run_id
        atomic_write_text(self.run_dir / RUN_ID_FILE, self.run_id + "\n")
        for watermark in (OPS_SYNCED_FILE, SYNCED_FILE):  # a new run gets the whole local record
            atomic_write_text(self.run_dir / watermark, "0\n")
        self._run_checked = True

    def _experiment_id(self) -> str:
        name = self.target.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            db = _sqlite_path(self.target.uri)
            # Without a location MLflow would put a sqlite store's artifacts in ./mlruns of the cwd.
            location = (db.parent / "mlartifacts").as_uri() if db else None
            try:
                return self._client.create_experiment(name, artifact_location=location)
            except MlflowException:  # another process created it in the meantime
                experiment = self._client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments "
                                "restore`) or set another tracking.experiment")
        return experiment.experiment_id

    def _replay_ops(self) -> None:
        synced_path = self.run_dir / OPS_SYNCED_FILE
        for end, op in _jsonl_records(self.run_dir / OPS_FILE, _read_offset(synced_path)):
            try:
                self._apply(op)
            except Exception as exc:
                if not _is_rejection(exc):
                    raise
                log.warning("MLflow refused %s (%s); dropped", op["op"], _describe(exc))
            atomic_write_text(synced_path, f"{end}\n")

    def _apply(self, op: dict) -> None:
        kind = op["op"]
        if kind == "params":
            self._log_new_params(_clean(op["params"], MAX_PARAM_VAL_LENGTH))
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in _clean(op["tags"], MAX_TAG_VAL_LENGTH).items()]
            for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=tags[start:start + MAX_PARAMS_TAGS_PER_BATCH])
        elif kind == "artifact":
            self._log_artifact_now(Path(op["path"]), op["artifact_path"])
        elif kind == "status" and op["status"] in TERMINAL_STATUSES:
            self._client.set_terminated(self.run_id, op["status"])
        elif kind == "status":
            self._client.update_run(self.run_id, op["status"])

    def _log_new_params(self, params: dict[str, str]) -> None:
        """MLflow params are immutable: skip those already logged, warn about changed values."""
        logged = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("MLflow params cannot change within a run; kept the first values of %s",
                        ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def _log_artifact_now(self, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            log.warning("MLflow artifact %s no longer exists; not logged", path)

    def _push_metrics(self) -> int:
        """Send metrics.jsonl from the watermark in batches, moving the watermark after each."""
        synced_path = self.run_dir / SYNCED_FILE
        offset = _read_offset(synced_path)
        sent, batch = 0, []
        for end, record in _jsonl_records(self.metrics_path, offset):
            metrics = [Metric(k, v, record["time_ms"], record["step"]) for k, v in record["metrics"].items()]
            if batch and len(batch) + len(metrics) > MAX_METRICS_PER_BATCH:
                sent += self._send_metric_batch(batch, synced_path, offset)
                batch = []
            batch += metrics
            offset = end
        if batch:
            sent += self._send_metric_batch(batch, synced_path, offset)
        return sent

    def _send_metric_batch(self, batch: list[Metric], synced_path: Path, end_offset: int) -> int:
        try:
            self._client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            log.warning("MLflow refused %d metric values (%s); they stay only in %s", len(batch),
                        _describe(exc), self.metrics_path)
            batch = []
        atomic_write_text(synced_path, f"{end_offset}\n")
        return len(batch)


def open_tracker(config: Config, run_dir: Path, *, rank: int) -> Tracker:
    """Rank 0: reopen the run whose id is in `<run_dir>/mlflow_run_id`, else create it; others: no-op."""
    if rank != 0:
        return Tracker()
    if not config.tracking.enabled:
        return LocalTracker(run_dir)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = TrackingTarget.from_config(config)
    target.save(run_dir)
    tracker = MlflowTracker(run_dir, target)
    if tracker.run_id is not None:  # a resumed or requeued job: the run is live again
        tracker._queue({"op": "status", "status": "RUNNING"}, flush=False)
    tracker.set_tags(environment_tags(config))
    return tracker


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


def sync_run(run_dir: Path, *, uri: str | None = None) -> int:
    """Send what MLflow has not got from a run directory; returns the number of metric values sent.

    `uri` sends to another store than the one the run was started with (a new run is created there).
    Raises TrackingError when the store is still unreachable. Run it when training has stopped.
    """
    run_dir = Path(run_dir)
    target = TrackingTarget.load(run_dir)
    if uri is not None and uri != target.uri:
        target = dataclasses.replace(target, uri=uri)  # the run id is unknown there: a new run is made
        target.save(run_dir)
    tracker = MlflowTracker(run_dir, target)
    try:
        return tracker.push()
    except Exception as exc:
        raise TrackingError(f"sync {run_dir}: MLflow at {_hide_credentials(target.uri)} failed: "
                            f"{_describe(exc)}") from exc
    finally:
        tracker.close()


def log_stage(tracker: Tracker, stage: str, figures: Mapping[str, Any], status: str = "done", *,
              step: int = 0) -> None:
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


def loss_curve_png(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Plot train and val loss against step; None (and no file) when there is no loss yet."""
    curves: dict[str, dict[int, float]] = {METRIC_TRAIN_LOSS: {}, METRIC_VAL_LOSS: {}}
    for record in read_metrics(metrics_jsonl):
        for name, points in curves.items():
            if name in record["metrics"]:
                points[record["step"]] = record["metrics"][name]  # a resumed run's redone step wins
    if not any(curves.values()):
        return None
    figure = Figure(figsize=(7, 4), layout="tight")
    axes = figure.add_subplot()
    for (name, points), style in zip(curves.items(), ("-", "o-")):
        if points:
            steps = sorted(points)
            axes.plot(steps, [points[s] for s in steps], style, label=name, markersize=3)
    axes.set(xlabel="step", ylabel="loss", title=Path(metrics_jsonl).parent.name)
    axes.grid(alpha=0.3)
    axes.legend()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_png)
    return out_png


# ---------------------------------------------------------------------------------------------
# Comparing runs and the UI

COMPARE_COLUMNS = ("name", "family", "params", "tokens", "train_loss", "val_loss", "bits_per_byte",
                   "tokens_per_s", "status")
_COLUMN_METRICS = {"tokens": METRIC_TOKENS_SEEN, "train_loss": METRIC_TRAIN_LOSS,
                   "val_loss": METRIC_VAL_LOSS, "bits_per_byte": METRIC_BITS_PER_BYTE,
                   "tokens_per_s": METRIC_TOKENS_PER_S}


def compare_runs(config_or_uri: Config | str, experiment: str | None = None,
                 sort_by: str = "val_loss") -> list[dict]:
    """One row per run of the experiment (COMPARE_COLUMNS plus run_id and experiment_id), sorted by a
    column; `-column` sorts descending; missing values always come last."""
    is_config = isinstance(config_or_uri, Config)
    uri = tracking_uri(config_or_uri) if is_config else config_or_uri
    settings = config_or_uri.tracking if is_config else TrackingConfig()
    experiment = experiment or settings.experiment
    column = sort_by.removeprefix("-")
    if column not in COMPARE_COLUMNS:
        raise ValueError(f"sort key {sort_by!r}: use one of {', '.join(COMPARE_COLUMNS)} "
                         "(prefix - to reverse)")
    _bound_requests(settings.request_timeout_s, settings.max_retries)
    rows = [_compare_row(run) for run in _all_runs(MlflowClient(uri), uri, experiment)]
    present = [r for r in rows if r[column] is not None]
    present.sort(key=lambda r: r[column], reverse=sort_by.startswith("-"))
    return present + [r for r in rows if r[column] is None]


def _all_runs(client: MlflowClient, uri: str, experiment: str) -> list[Run]:
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise TrackingError(f"no MLflow experiment {experiment!r} in {_hide_credentials(uri)}; "
                                f"experiments there: {', '.join(names) or 'none'}")
        runs, token = [], None
        while True:
            page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {_hide_credentials(uri)}: {_describe(exc)}") from exc


def _compare_row(run: Run) -> dict:
    metrics, params = run.data.metrics, run.data.params
    row = {"name": run.info.run_name, "family": params.get("model.family"),
           "params": metrics.get(METRIC_MODEL_PARAMS, _number(params.get(METRIC_MODEL_PARAMS)))}
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
    cells = [list(COMPARE_COLUMNS)] + [[_format_cell(col, row.get(col)) for col in COMPARE_COLUMNS]
                                      for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COMPARE_COLUMNS))]
    text_columns = {"name", "family", "status"}
    lines = ["  ".join(cell.ljust(w) if col in text_columns else cell.rjust(w)
                       for cell, w, col in zip(line, widths, COMPARE_COLUMNS)).rstrip() for line in cells]
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


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI page comparing runs (a single-page app: the route is in the fragment)."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def ui_command(uri: str, port: int) -> list[str]:
    """`mlflow server` for a store, bound to 127.0.0.1 with one worker (ready in ~10 s, not ~24 s)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    db = _sqlite_path(uri)
    if db is not None:  # uploads through the server land next to the store, not in the cwd
        command += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return command


def start_ui(uri: str, port: int, log_path: Path,
             timeout_s: float = 120) -> tuple[subprocess.Popen | None, str]:
    """Start the MLflow UI for a store and wait until it answers; returns (process, URL).

    An http(s) URI already is a server with its UI: (None, uri). Stop the process with `stop_ui`.
    """
    if uri.startswith(("http://", "https://")):
        return None, uri
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # Background job execution adds worker processes a UI does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(ui_command(uri, port), stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(process, url, log_path, timeout_s)
    return process, url


def _wait_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-2000:]
            raise TrackingError(f"mlflow server exited with code {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    stop_ui(process)
    raise TrackingError(f"mlflow server at {url} did not answer /health within {timeout_s:.0f} s; "
                        f"see {log_path}")


def stop_ui(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """Stop the server and its workers (its own process group): SIGTERM, then SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue
