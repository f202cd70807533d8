"""The MLflow run of a pipeline run: the only module of the project that imports mlflow.

The driver owns the run. `open_tracker` creates it (or reopens the one whose id is in
`<run_dir>/mlflow_run_id`, for a resumed or requeued job), and `MlflowTracker` sends the run's journal
(pipeline/tracking/journal.py) to it: what the driver logs itself, and what training's rank 0 appends
meanwhile, sent by a background thread (`syncing`). Only the driver changes the run's status, once,
after the last stage.

Durability: a tracking outage never stops training and loses nothing.
- Everything is in the journal before any request is made; `<run_dir>/metrics.synced` and
  `<run_dir>/mlflow_ops.synced` hold the byte offsets up to which MLflow has it.
- Requests are bounded (tracking.request_timeout_s, tracking.max_retries). After a failure: one warning,
  then a new attempt at most every `RETRY_INTERVAL_S` seconds and in `finish()`; `sync_run(run_dir)`
  (`pretrain sync RUN_DIR`) sends whatever is left. A resent batch carries its original timestamps,
  which MLflow deduplicates, so a batch whose reply was lost is never stored twice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from pipeline.config import Config
from pipeline.errors import TrackingError
from pipeline.run.artifacts import atomic_write_text
from pipeline.run.rundir import METRICS_SYNCED_FILE, OPS_FILE, OPS_SYNCED_FILE, RUN_ID_FILE
from pipeline.tracking.journal import Journal, following, jsonl_records, mlflow_run_id, read_text
from pipeline.tracking.local import LocalRun, TrackingTarget, environment_tags
from pipeline.tracking.names import (
    MAX_METRICS_PER_BATCH,
    clean,
    flatten_params,
    hide_credentials,
    sqlite_path,
)

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 60.0
LIVE_SYNC_INTERVAL_S = 5.0
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow 3 opens an experiment in the view its kind names: the model-training one, not GenAI traces.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# MLflow refuses more than 10 retries per request.
MLFLOW_MAX_RETRIES_LIMIT = 10
# Errors that mean MLflow will never accept this request; anything else is an outage worth retrying.
REJECTION_CODES = {"INVALID_PARAMETER_VALUE", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}
# MLflow reads its request bounds from the environment at each request; they are set only around our
# own requests, one request block at a time, and restored after.
_REQUEST_ENV_LOCK = threading.RLock()


def _is_rejection(exc: Exception) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code in REJECTION_CODES


def _describe(exc: Exception) -> str:
    """The first line of an error, short, without credentials (MLflow's messages quote the URL)."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    return hide_credentials(lines[0][:300])


def _read_offset(watermark: Path) -> int:
    return int(read_text(watermark) or 0)


@contextmanager
def bounded_requests(timeout_s: float, max_retries: int) -> Iterator[None]:
    """MLflow's defaults block about 4 minutes per call on a dead server: bound the requests made inside."""
    bounds = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),  # MLflow parses an int
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(min(max_retries, MLFLOW_MAX_RETRIES_LIMIT)),
    }
    with _REQUEST_ENV_LOCK:
        previous = {name: os.environ.get(name) for name in bounds}
        os.environ.update(bounds)
        try:
            yield
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class MlflowTracker(LocalRun):
    """The driver's run: the journal plus MLflow, with the outage handling described at the top."""

    retry_interval_s = RETRY_INTERVAL_S

    def __init__(self, run_dir: Path, target: TrackingTarget):
        super().__init__(run_dir)
        self.target = target
        self._client = MlflowClient(target.uri)
        self.run_id = mlflow_run_id(self.run_dir)
        self._run_checked = False
        self._retry_at = 0.0  # time.monotonic() before which no request is tried after a failure
        self._in_outage = False
        self._send_lock = threading.Lock()  # the live-sync thread and the driver send one at a time

    # -- the public interface: record locally first, then try to send

    def log_params(self, params: Mapping[str, Any]) -> None:
        plain = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
        self.append_op({"op": "params", "params": flatten_params(plain)})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        self._flush()

    def append_op(self, op: dict) -> None:
        super().append_op(op)
        self._flush()

    @contextmanager
    def syncing(self, interval_s: float = LIVE_SYNC_INTERVAL_S) -> Iterator[None]:
        """While the block runs (training, in worker processes), send what they append to the journal
        every `interval_s` seconds, so the MLflow UI shows the curves as they grow."""
        with following(self._flush, interval_s, name="mlflow-live-sync"):
            yield

    def finish(self, status: str = "FINISHED") -> None:
        status = status.upper()
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish(status={status!r}): use one of {', '.join(TERMINAL_STATUSES)}")
        Journal.append_op(self, {"op": "status", "status": status})
        self._flush(force=True)
        if self._in_outage:
            log.warning(
                "MLflow tracking: %s still holds data MLflow has not got; send it with "
                "`pretrain sync %s` once %s is reachable",
                self.run_dir,
                self.run_dir,
                hide_credentials(self.target.uri),
            )
        self.close()

    # -- sending

    def _flush(self, *, force: bool = False) -> None:
        """Send everything pending unless a recent failure says to wait; never raises."""
        if not force and time.monotonic() < self._retry_at:
            return
        try:
            with self._send_lock:
                sent = self.push()
        except Exception as exc:  # any failure of the store is an outage: training must go on
            self._retry_at = time.monotonic() + self.retry_interval_s
            if not self._in_outage:
                log.warning(
                    "MLflow tracking at %s failed (%s); training continues, metrics are kept in %s "
                    "and resent every %.0f s",
                    hide_credentials(self.target.uri),
                    _describe(exc),
                    self.metrics_path,
                    self.retry_interval_s,
                )
            self._in_outage = True
            return
        if self._in_outage:
            log.warning(
                "MLflow tracking at %s is reachable again; sent %d metric values kept locally",
                hide_credentials(self.target.uri),
                sent,
            )
        self._in_outage = False

    def push(self) -> int:
        """Make sure the run exists, send pending operations, then metrics; returns metric values sent."""
        with bounded_requests(self.target.request_timeout_s, self.target.max_retries):
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
                log.warning(
                    "MLflow run %s is not in %s; creating a new run and sending the whole local record to it",
                    self.run_id,
                    hide_credentials(self.target.uri),
                )
        run = self._client.create_run(self._experiment_id(), run_name=self.target.run_name)
        self.run_id = run.info.run_id
        atomic_write_text(self.run_dir / RUN_ID_FILE, self.run_id + "\n")
        for watermark in (OPS_SYNCED_FILE, METRICS_SYNCED_FILE):  # a new run gets the whole local record
            atomic_write_text(self.run_dir / watermark, "0\n")
        self._run_checked = True

    def _experiment_id(self) -> str:
        name = self.target.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            db = sqlite_path(self.target.uri)
            # Without a location MLflow would put a sqlite store's artifacts in ./mlruns of the cwd.
            location = (db.parent / "mlartifacts").as_uri() if db else None
            try:
                return self._client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
            except MlflowException:  # another process created it in the meantime
                experiment = self._client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments "
                "restore`) or set another tracking.experiment"
            )
        return experiment.experiment_id

    def _replay_ops(self) -> None:
        synced_path = self.run_dir / OPS_SYNCED_FILE
        for end, op in jsonl_records(self.run_dir / OPS_FILE, _read_offset(synced_path)):
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
            self._log_new_params(clean(op["params"], MAX_PARAM_VAL_LENGTH))
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in clean(op["tags"], MAX_TAG_VAL_LENGTH).items()]
            for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=tags[start : start + MAX_PARAMS_TAGS_PER_BATCH])
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
            log.warning(
                "MLflow params cannot change within a run; kept the first values of %s",
                ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""),
            )
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def _log_artifact_now(self, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            log.warning("MLflow artifact %s no longer exists; not logged", path)

    def _push_metrics(self) -> int:
        """Send metrics.jsonl from the watermark in batches, moving the watermark after each."""
        synced_path = self.run_dir / METRICS_SYNCED_FILE
        offset = _read_offset(synced_path)
        sent, batch = 0, []
        for end, record in jsonl_records(self.metrics_path, offset):
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
            log.warning(
                "MLflow refused %d metric values (%s); they stay only in %s",
                len(batch),
                _describe(exc),
                self.metrics_path,
            )
            batch = []
        atomic_write_text(synced_path, f"{end_offset}\n")
        return len(batch)


def open_tracker(config: Config, run_dir: Path) -> LocalRun:
    """The driver's run: reopen the MLflow run whose id is in `<run_dir>/mlflow_run_id`, else create it
    (the journal alone when tracking.enabled is false)."""
    if not config.tracking.enabled:
        return LocalRun(run_dir)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = TrackingTarget.from_config(config)
    target.save(run_dir)
    tracker = MlflowTracker(run_dir, target)
    if tracker.run_id is not None:  # a resumed or requeued job: the run is live again
        Journal.append_op(tracker, {"op": "status", "status": "RUNNING"})
    tracker.set_tags(environment_tags(config))
    return tracker


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
        raise TrackingError(
            f"sync {run_dir}: MLflow at {hide_credentials(target.uri)} failed: {_describe(exc)}"
        ) from exc
    finally:
        tracker.close()


def experiment_runs(uri: str, experiment: str, request_timeout_s: float, max_retries: int) -> list[Run]:
    """Every run of an MLflow experiment, or TrackingError naming the experiments there are."""
    client = MlflowClient(uri)
    try:
        with bounded_requests(request_timeout_s, max_retries):
            return _all_runs(client, uri, experiment)
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {hide_credentials(uri)}: {_describe(exc)}") from exc


def _all_runs(client: MlflowClient, uri: str, experiment: str) -> list[Run]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(
            f"no MLflow experiment {experiment!r} in {hide_credentials(uri)}; "
            f"experiments there: {', '.join(names) or 'none'}"
        )
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs
