"""The durable local record of a run's tracking, and the sink training ranks log through.

Every metric first lands as one JSON line in `<run_dir>/metrics.jsonl`
(`{"step": int, "time_ms": int, "metrics": {name: float}}`); params, tags, artifacts and status
changes land in `<run_dir>/mlflow_ops.jsonl`. Both files are append-only, so the driver and the
rank-0 training worker can write them at once without losing each other's records. The driver's
`pipeline.tracking.store.MlflowTracker` sends them to MLflow and keeps a watermark (byte offset) of
what MLflow has. No mlflow import here: training ranks only ever see a `Journal` or a `NullSink`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.run.rundir import METRICS_FILE, OPS_FILE, RUN_ID_FILE
from pipeline.tracking.names import MAX_METRICS_PER_BATCH, safe_name

log = logging.getLogger(__name__)


class NullSink:
    """What ranks other than 0 log through: nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metric values at `step`."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a file or directory to the run."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (mutable, unlike params)."""

    def close(self) -> None:
        """Close the files; the run itself stays open (the driver ends it)."""


class Journal(NullSink):
    """The local record: metrics.jsonl and mlflow_ops.jsonl. Training's rank 0 logs through one; the
    driver's MLflow tracker is one that also sends."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._metrics_file = open(self.metrics_path, "ab")  # noqa: SIM115 (kept open for the run; close())
        if self._metrics_file.tell() and not _ends_with_newline(self.metrics_path):
            self._metrics_file.write(b"\n")  # terminate a line torn by a crash so the next one parses

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {safe_name(k): float(v) for k, v in metrics.items()}
        names = list(values)
        time_ms = int(time.time() * 1000)
        for start in range(0, len(names), MAX_METRICS_PER_BATCH):  # one record never exceeds one MLflow batch
            chunk = {k: values[k] for k in names[start : start + MAX_METRICS_PER_BATCH]}
            record = {"step": int(step), "time_ms": time_ms, "metrics": chunk}
            self._metrics_file.write(json.dumps(record).encode() + b"\n")
        self._metrics_file.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.append_op({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.append_op({"op": "tags", "tags": dict(tags)})

    def append_op(self, op: dict) -> None:
        with open(self.run_dir / OPS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(op) + "\n")

    def close(self) -> None:
        self._metrics_file.close()


@contextmanager
def following(action: Callable[[], None], interval_s: float, name: str) -> Iterator[None]:
    """While the block runs (training, in other processes), call `action` every `interval_s` seconds in
    a background thread, and once more at the end: how the driver follows what rank 0 appends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            action()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        action()


def training_sink(run_dir: Path, rank: int) -> NullSink:
    """The sink a training rank logs through: the journal on rank 0, nothing elsewhere."""
    return Journal(run_dir) if rank == 0 else NullSink()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_text(path: Path) -> str | None:
    """The stripped content of a small file; None when it is missing or empty."""
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def mlflow_run_id(run_dir: Path) -> str | None:
    """The MLflow run id the driver recorded for this run directory, if any."""
    return read_text(Path(run_dir) / RUN_ID_FILE)


def jsonl_records(path: Path, offset: int = 0) -> Iterator[tuple[int, dict]]:
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
    return [record for _, record in jsonl_records(Path(metrics_jsonl))]


def last_metric(metrics_jsonl: str | Path, name: str) -> tuple[int, float] | None:
    """(step, value) of the newest record holding metric `name`; None when there is none."""
    found = None
    for record in read_metrics(metrics_jsonl):
        if name in record["metrics"]:
            found = (record["step"], record["metrics"][name])
    return found
