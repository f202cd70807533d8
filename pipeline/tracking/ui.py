"""`pretrain ui`: the MLflow UI server for a store, on 127.0.0.1, started and stopped as a process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.errors import TrackingError
from pipeline.tracking.names import sqlite_path


def ui_command(uri: str, port: int) -> list[str]:
    """`mlflow server` for a store, bound to 127.0.0.1 with one worker (ready in ~10 s, not ~24 s)."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    db = sqlite_path(uri)
    if db is not None:  # uploads through the server land next to the store, not in the cwd
        command += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return command


def start_ui(uri: str, port: int, log_path: Path, timeout_s: float = 120) -> tuple[subprocess.Popen | None, str]:
    """Start the MLflow UI for a store and wait until it answers; returns (process, URL).

    An http(s) URI already is a server with its UI: (None, uri). Stop the process with `stop_ui`.
    """
    if uri.startswith(("http://", "https://")):
        return None, uri
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # Background job execution adds worker processes a UI does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            ui_command(uri, port), stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
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
    raise TrackingError(f"mlflow server at {url} did not answer /health within {timeout_s:.0f} s; see {log_path}")


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
