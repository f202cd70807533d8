"""Shared fixtures for pipeline tests: a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline.tracking import ui


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def restore_mlflow_request_env(monkeypatch):
    """The tracker bounds MLflow's requests through os.environ; undo that after the test."""
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def mlflow_server(tmp_path):
    """start(port=None) -> (process, url): an `mlflow server` on a sqlite store in tmp_path. Calling it
    again after a kill restarts the server on the same store (and the same port if given)."""
    started = []

    def start(port: int | None = None):
        uri = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
        process, url = ui.start_ui(uri, port or free_port(), tmp_path / "server.log")
        started.append(process)
        return process, url

    yield start
    for process in started:
        ui.stop_ui(process)


@pytest.fixture
def repo_artifacts_dir() -> Path:
    """`test-artifacts/` in the repository root, where tests leave files for humans and CI."""
    path = Path(__file__).resolve().parents[2] / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


def train_tiny_run(arch: str, shard_dir: Path, workdir: Path):
    """A 2-step ZeRO-2 training run (one worker, tracking off) -> (config, run_dir)."""
    from pipeline.run.rundir import prepare_run_dir
    from pipeline.training.ray_train import run_training
    from tests.pipeline.eval.test_export import tiny_config

    config = tiny_config(
        arch,
        f"run.workdir={workdir}",
        f"run.name={arch}",
        "tracking.enabled=false",
        "train.eval_every=0",
        "train.zero_stage=2",
    )
    run_dir, _ = prepare_run_dir(config)
    run_training(config, shard_dir, run_dir)
    return config, run_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_shard_dir, tiny_bert_shard_dir):
    """trained_run(arch) -> (config, run_dir, shard_dir): each architecture trained once per session."""
    runs: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in runs:
            shard_dir = tiny_bert_shard_dir if arch == "bert" else tiny_shard_dir
            runs[arch] = (*train_tiny_run(arch, shard_dir, tmp_path_factory.mktemp(f"run-{arch}")), shard_dir)
        return runs[arch]

    return get
