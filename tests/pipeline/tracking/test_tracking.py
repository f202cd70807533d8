"""MLflow tracking against a sqlite store: params, metrics, resume, secrets, outages and sync."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.errors import ConfigError, TrackingError
from pipeline.run import rundir
from pipeline.tracking import compare, journal, local, names, plot, store

pytestmark = pytest.mark.usefixtures("restore_mlflow_request_env")


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating one costs about 4 s."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def make_config(tmp_path: Path, uri: str, name: str, *overrides: str):
    return load_config(
        None,
        [f"run.name={name}", f"run.workdir={tmp_path}", f"tracking.uri={uri}", "tracking.experiment=tests", *overrides],
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def tracking_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pipeline.tracking") and r.levelno == logging.WARNING
    ]


def test_flatten_params_joins_keys_with_dots_and_stringifies():
    flat = names.flatten_params({"a": {"b": 1, "c": [True, {"d": None}]}, "e": [], "f": {}})
    assert flat == {"a.b": "1", "a.c.0": "True", "a.c.1.d": "None", "e": "[]", "f": "{}"}


def test_secrets_are_redacted_but_ordinary_token_counts_are_not():
    assert names.redact("hub.hf_token", "abc") == names.REDACTED
    assert names.redact("db.password", "abc") == names.REDACTED
    assert names.redact("aws_secret_access_key", "abc") == names.REDACTED
    assert names.redact("tracking.uri", "https://bob:pw@host/x") == f"https://{names.REDACTED}@host/x"
    assert names.redact("note", "use hf_" + "a" * 30 + " now") == f"use {names.REDACTED} now"
    for key in ("eval.max_new_tokens", "data.shard_tokens", "tokenizer.vocab_size", "model.n_heads"):
        assert names.redact(key, "64") == "64"


def test_params_are_flattened_limited_and_filtered_in_mlflow(tmp_path, store_uri):
    config = make_config(tmp_path, store_uri, "params")
    tracker = store.open_tracker(config, tmp_path / "run")
    tracker.log_params(config)
    long_key = "k" * 300
    tracker.log_params(
        {
            "extra": {
                "long": "v" * 7000,
                "odd key$": 1,
                long_key: 3,
                "hf_token": "hf_" + "x" * 30,
                "url": "https://u:p@h/x",
            },
            "../escape": 2,
            "a//b": 4,
        }
    )
    tracker.finish()

    params = MlflowClient(store_uri).get_run(tracker.run_id).data.params
    assert params["train.lr"] == str(config.train.lr)
    assert params["data.sources.0.path"] == config.data.sources[0].path
    assert len(params["extra.long"]) == 6000 and params["extra.long"].endswith(names.TRUNCATION_MARK)
    assert params["extra.odd key_"] == "1" and params["_.._escape"] == "2" and params["_a__b"] == "4"
    assert [v for k, v in params.items() if k.startswith("extra.kkk")] == ["3"]
    assert params["extra.hf_token"] == names.REDACTED
    assert params["extra.url"] == f"https://{names.REDACTED}@h/x"
    assert not any("x" * 30 in v for v in params.values())


def test_metrics_tags_and_stage_figures_reach_mlflow(tmp_path, store_uri):
    tracker = store.open_tracker(make_config(tmp_path, store_uri, "metrics"), tmp_path / "run")
    for step in range(5):
        tracker.log_metrics({names.METRIC_TRAIN_LOSS: 5.0 - step}, step=step)
    local.log_stage(tracker, "eval", {"bits_per_byte": 1.25, "fingerprint": "abc"}, step=4)
    tracker.set_tags({"api_token": "t0ps3cret", "note": "hello"})
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    (tmp_path / "report.json").write_text("{}")
    tracker.log_artifact(tmp_path / "tokenizer", "tokenizer")
    tracker.log_artifact(tmp_path / "report.json", "eval")
    tracker.finish()

    client = MlflowClient(store_uri)
    run = client.get_run(tracker.run_id)
    assert steps_of(client, tracker.run_id, names.METRIC_TRAIN_LOSS) == [0, 1, 2, 3, 4]
    assert run.data.metrics[names.METRIC_BITS_PER_BYTE] == 1.25
    assert "eval/fingerprint" not in run.data.params  # stage figures go to the summary table
    summary = json.loads(
        Path(client.download_artifacts(tracker.run_id, rundir.STAGE_SUMMARY_FILE, str(tmp_path))).read_text()
    )
    assert summary["columns"] == ["stage", "status", "figure", "value"]
    assert summary["data"] == [["eval", "done", "bits_per_byte", 1.25], ["eval", "done", "fingerprint", "abc"]]
    assert run.data.tags["stage.eval"] == "done" and run.data.tags["host"] == socket.gethostname()
    assert run.data.tags["api_token"] == names.REDACTED and run.data.tags["note"] == "hello"
    assert run.info.status == "FINISHED" and run.info.run_name == "metrics"
    logged = [a.path for folder in ("tokenizer", "eval") for a in client.list_artifacts(tracker.run_id, folder)]
    assert logged == ["tokenizer/tokenizer.json", "eval/report.json"]
    store_dir = Path(store_uri.removeprefix("sqlite:///")).parent  # not ./mlruns of the cwd
    assert store_dir in Path(run.info.artifact_uri.removeprefix("file://")).parents
    records = journal.read_metrics(tmp_path / "run" / rundir.METRICS_FILE)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 4]


def test_reopen_continues_the_same_run(tmp_path, store_uri, caplog):
    run_dir = tmp_path / "run"
    first = store.open_tracker(make_config(tmp_path, store_uri, "resume"), run_dir)
    first.log_params({"train": {"lr": 0.1}})
    first.log_metrics({names.METRIC_TRAIN_LOSS: 3.0}, step=0)
    first.finish("KILLED")
    with open(run_dir / rundir.METRICS_FILE, "ab") as f:
        f.write(b'{"step": 1, "ti')  # a record torn by a crash

    second = store.open_tracker(make_config(tmp_path, store_uri, "resume"), run_dir)
    client = MlflowClient(store_uri)
    assert second.run_id == first.run_id
    assert client.get_run(second.run_id).info.status == "RUNNING"
    second.log_params({"train": {"lr": 0.2}})  # params are immutable: warned about, never raised
    second.log_metrics({names.METRIC_TRAIN_LOSS: 2.0}, step=1)
    second.finish()

    assert steps_of(client, first.run_id, names.METRIC_TRAIN_LOSS) == [0, 1]
    assert client.get_run(first.run_id).data.params["train.lr"] == "0.1"
    assert any("train.lr" in message for message in tracking_warnings(caplog))
    assert [r["step"] for r in journal.read_metrics(run_dir / rundir.METRICS_FILE)] == [0, 1]


def test_training_ranks_log_through_the_journal_and_the_driver_sends_it(tmp_path, store_uri):
    config = make_config(tmp_path, store_uri, "shared")
    driver = store.open_tracker(config, tmp_path / "run")
    local.log_stage(driver, "tokenizer", {"vocab_size": 512})
    client = MlflowClient(store_uri)
    with driver.syncing(interval_s=0.2):
        worker = journal.training_sink(tmp_path / "run", rank=0)  # rank 0 of the training workers
        assert not hasattr(worker, "finish") and "mlflow" not in type(worker).__module__
        for step in range(3):
            worker.log_metrics({names.METRIC_TRAIN_LOSS: 3.0 - step}, step=step)
        worker.set_tags({"train.resumed_from_step": 7})
        deadline = time.monotonic() + 30  # the live sync sends it while training still runs
        while len(steps_of(client, driver.run_id, names.METRIC_TRAIN_LOSS)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert steps_of(client, driver.run_id, names.METRIC_TRAIN_LOSS) == [0, 1, 2]
        assert client.get_run(driver.run_id).info.status == "RUNNING"
        worker.close()
    local.log_stage(driver, "eval", {"bits_per_byte": 1.5}, step=2)
    driver.finish()

    run = client.get_run(driver.run_id)
    assert run.data.tags["train.resumed_from_step"] == "7"
    assert run.data.metrics["val/bits_per_byte"] == 1.5
    assert not any(name.startswith("tokenizer/") for name in run.data.metrics)  # a table row, no chart
    assert run.data.tags["stage.tokenizer"] == run.data.tags["stage.eval"] == "done"
    assert run.info.status == "FINISHED"


def test_other_ranks_log_nothing_and_disabled_tracking_keeps_only_the_local_record(tmp_path):
    other_rank = journal.training_sink(tmp_path / "rank1", rank=1)
    other_rank.log_metrics({"train/loss": 1.0}, step=0)
    other_rank.close()
    assert not (tmp_path / "rank1").exists()

    disabled = load_config(None, [f"run.workdir={tmp_path}", "tracking.enabled=false"])
    local = store.open_tracker(disabled, tmp_path / "run")
    local.log_metrics({"train/loss": 1.0}, step=0)
    local.finish()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [rundir.METRICS_FILE]


def test_outage_never_stops_training_and_sync_sends_every_step_once(tmp_path, store_uri, caplog):
    dead_uri = f"http://127.0.0.1:{closed_port()}"
    config = make_config(tmp_path, dead_uri, "outage", "tracking.request_timeout_s=1", "tracking.max_retries=0")
    run_dir = tmp_path / "run"
    started = time.monotonic()
    tracker = store.open_tracker(config, run_dir)
    tracker.log_params(config)
    for step in range(30):
        tracker.log_metrics({names.METRIC_TRAIN_LOSS: 1.0 / (step + 1), "lr": 0.1}, step=step)
    tracker.finish()
    assert time.monotonic() - started < 20
    assert len(tracking_warnings(caplog)) == 2  # the outage, then the reminder to sync at finish
    assert len(journal.read_metrics(run_dir / rundir.METRICS_FILE)) == 30

    with pytest.raises(TrackingError, match="sync"):
        store.sync_run(run_dir)  # still down
    assert store.sync_run(run_dir, uri=store_uri) == 60
    assert store.sync_run(run_dir) == 0

    client = MlflowClient(store_uri)
    run_id = (run_dir / rundir.RUN_ID_FILE).read_text().strip()
    run = client.get_run(run_id)
    assert steps_of(client, run_id, names.METRIC_TRAIN_LOSS) == list(range(30))
    assert steps_of(client, run_id, "lr") == list(range(30))
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == str(config.train.lr)
    assert run.data.tags["host"] == socket.gethostname()
    ops_size = (run_dir / rundir.OPS_FILE).stat().st_size
    assert (run_dir / rundir.OPS_SYNCED_FILE).read_text().strip() == str(ops_size)


def test_backlog_is_resent_on_a_later_call_once_the_store_answers(tmp_path, store_uri, caplog, monkeypatch):
    tracker = store.open_tracker(make_config(tmp_path, store_uri, "backlog"), tmp_path / "run")
    tracker.retry_interval_s = 0
    real_log_batch = tracker._client.log_batch

    def down(*args, **kwargs):
        raise ConnectionError("server gone")

    monkeypatch.setattr(tracker._client, "log_batch", down)
    for step in range(10):
        tracker.log_metrics({names.METRIC_TRAIN_LOSS: float(step)}, step=step)
    monkeypatch.setattr(tracker._client, "log_batch", real_log_batch)
    tracker.log_metrics({names.METRIC_TRAIN_LOSS: 10.0}, step=10)

    client = MlflowClient(store_uri)
    assert steps_of(client, tracker.run_id, names.METRIC_TRAIN_LOSS) == list(range(11))
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 2 and "reachable again" in warnings[1]
    tracker.finish()
    assert store.sync_run(tmp_path / "run") == 0


def test_compare_rows_sorting_and_table(tmp_path, store_uri):
    for name, family, val_loss in (("b-run", "bert", 2.5), ("a-run", "gpt", 1.5), ("c-run", "gpt", None)):
        config = make_config(tmp_path, store_uri, name, "tracking.experiment=compare")
        tracker = store.open_tracker(config, tmp_path / name)
        tracker.log_params({"model": {"family": family}})
        metrics = {
            names.METRIC_TRAIN_LOSS: 3.0,
            names.METRIC_MODEL_PARAMS: 1234567,
            names.METRIC_TOKENS_SEEN: 40960,
            names.METRIC_TOKENS_PER_S: 1500.0,
        }
        tracker.log_metrics(metrics | ({names.METRIC_VAL_LOSS: val_loss} if val_loss else {}), step=1)
        tracker.finish()

    rows = compare.compare_runs(store_uri, "compare")
    assert [r["name"] for r in rows] == ["a-run", "b-run", "c-run"]
    assert rows[0]["family"] == "gpt" and rows[0]["val_loss"] == 1.5 and rows[0]["params"] == 1234567
    descending = compare.compare_runs(store_uri, "compare", "-val_loss")
    assert [r["name"] for r in descending] == ["b-run", "a-run", "c-run"]
    table = compare.format_table(rows).splitlines()
    assert table[0].split() == list(compare.COMPARE_COLUMNS)
    assert table[1].split() == ["a-run", "gpt", "1.23M", "40.96K", "3.0000", "1.5000", "-", "1,500", "FINISHED"]
    with pytest.raises(ConfigError, match="--sort"):
        compare.compare_runs(store_uri, "compare", "loss")
    with pytest.raises(TrackingError, match="compare"):
        compare.compare_runs(store_uri, "nope")


def test_loss_curve_png(tmp_path):
    metrics = tmp_path / rundir.METRICS_FILE
    assert plot.loss_curve_png(metrics, tmp_path / "none.png") is None
    metrics.write_text(
        "".join(
            json.dumps({"step": s, "time_ms": 0, "metrics": m}) + "\n"
            for s, m in ((0, {"train/loss": 5.0}), (1, {"train/loss": 4.0, "val/loss": 4.5}))
        )
    )
    png = plot.loss_curve_png(metrics, tmp_path / "loss.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_sync_of_an_untracked_run_directory_explains(tmp_path):
    with pytest.raises(TrackingError, match="not tracked"):
        store.sync_run(tmp_path)
