"""`pretrain run` end to end: a real local Ray, 2 DeepSpeed training workers, a sqlite MLflow store.

Two runs share one workdir: the second (a different model) must reuse the first's cached tokenizer and
shards. Then `pretrain eval` on an older checkpoint, `pretrain compare`, a stage failure, and a run
stopped by SIGTERM during training that `pretrain resume` finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.run.orchestrate import checkpoint_requests_outside_training

REPO = Path(__file__).resolve().parents[3]
PRESET = str(REPO / "configs" / "gpt-tiny.yaml")
MAX_STEPS = 20
# gpt-tiny on 120 stdlib files with a 512-token vocabulary and a 2-layer, 64-wide model: ~25 s a run.
TINY = [
    "data.max_documents=120",
    "data.val_permille=100",
    "tokenizer.vocab_size=512",
    "tokenizer.sample_bytes=1000000",
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=2",
    f"train.max_steps={MAX_STEPS}",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "eval.max_windows=32",
    "eval.max_new_tokens=8",
    "cluster.num_workers=2",
]
STAGES = ("tokenizer", "shard", "train", "eval")

pytestmark = pytest.mark.slow


def pretrain(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def start_pretrain(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "launch.cli", *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, text=True
        )


def mlflow_run(workdir: Path, run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return client, client.get_run((run_dir / "mlflow_run_id").read_text().strip())


def run_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())["stages"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """(workdir, first, second): CompletedProcess of `pretrain run` for two models on the same data."""
    workdir = tmp_path_factory.mktemp("e2e")
    first = pretrain("run", PRESET, f"run.workdir={workdir}", "run.name=first", *TINY)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = pretrain("run", PRESET, f"run.workdir={workdir}", "run.name=second", *TINY, "model.n_layers=1")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return workdir, first, second


def test_every_stage_runs_and_the_summary_ends_with_a_sample_and_the_ui_command(two_runs):
    workdir, first, _ = two_runs
    run_dir = workdir / "runs" / "first"
    assert [run_state(run_dir)[stage]["status"] for stage in STAGES] == ["done"] * 4
    for stage in STAGES:
        assert f"\n{stage}: " in first.stdout
    assert "--- sample from prompt 'def __init__(self'" in first.stdout
    assert f"open the MLflow UI: pretrain ui {run_dir / 'config.yaml'}" in first.stdout
    figures = run_state(run_dir)["train"]["figures"]
    assert figures["steps"] == MAX_STEPS and figures["world_size"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{MAX_STEPS:08d}"


def test_mlflow_run_holds_params_a_falling_loss_eval_metrics_and_artifacts(two_runs):
    workdir, _, _ = two_runs
    run_dir = workdir / "runs" / "first"
    client, run = mlflow_run(workdir, run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.params["model.d_model"] == "64" and run.data.params["cluster.num_workers"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in losses]
    assert steps == list(range(2, MAX_STEPS + 1, 2))  # every logged step once, rank 0 only
    values = [m.value for m in sorted(losses, key=lambda m: m.step)]
    assert values[-1] < values[0] - 0.3
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [10, 20]
    for name in ("val/perplexity", "val/bits_per_byte"):  # the eval stage's, at the evaluated step
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [MAX_STEPS]
    # One-off stage figures are rows of the stage summary table, not metric charts.
    assert {name.split("/")[0] for name in run.data.metrics} == {"train", "val"}
    summary = json.loads((run_dir / "stage_summary.json").read_text())
    assert {row[0] for row in summary["data"]} == set(STAGES)
    assert {f"stage.{s}" for s in STAGES} <= {k for k, v in run.data.tags.items() if v == "done"}
    assert "host" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {
        a.path
        for folder in ("eval", "tokenizer", "checkpoints")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "config.yaml",
        "deepspeed_config.json",
        "tokenizer/tokenizer.json",
        "eval/report.json",
        "eval/summary.txt",
        "eval/loss_curve.png",
        "checkpoints/manifest.json",
        "stage_summary.json",
    } <= artifacts
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert manifest["latest"] == f"step-{MAX_STEPS:08d}"
    assert [c["step"] for c in manifest["checkpoints"]] == [10, 20]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["samples"] and report["step"] == MAX_STEPS


def test_second_run_reuses_the_cached_tokenizer_and_shards(two_runs):
    workdir, _, second = two_runs
    state = run_state(workdir / "runs" / "second")
    assert state["tokenizer"]["reused"] and state["shard"]["reused"] and not state["train"]["reused"]
    assert "tokenizer: reused" in second.stdout and "shard: reused" in second.stdout
    assert len(list((workdir / "cache" / "tokenizer").iterdir())) == 1
    assert len(list((workdir / "cache" / "shard").iterdir())) == 1
    assert state["shard"]["path"] == run_state(workdir / "runs" / "first")["shard"]["path"]


def test_eval_command_scores_an_older_checkpoint_into_the_same_mlflow_run(two_runs):
    workdir, _, _ = two_runs
    run_dir = workdir / "runs" / "second"
    out = pretrain("eval", str(run_dir), "--checkpoint", "step-00000010")
    assert out.returncode == 0, out.stderr
    assert "checkpoint step-00000010" in out.stdout
    assert json.loads((run_dir / "eval" / "report.json").read_text())["step"] == 10
    client, run = mlflow_run(workdir, run_dir)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/perplexity")) == [10, MAX_STEPS]
    assert run.info.status == "FINISHED"


def test_compare_lists_both_runs_from_mlflow(two_runs):
    workdir, _, _ = two_runs
    out = pretrain("compare", "pretrain-demo", "--uri", f"sqlite:///{workdir / 'mlflow.db'}")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("first", "second"))]
    assert len(rows) == 2 and all("gpt" in row and "FINISHED" in row for row in rows)


def test_a_corrupt_shard_is_one_line_and_its_fix_works(two_runs):
    """Stage by stage with --only/--from; a byte flipped in a shard after sharding fails the train stage
    in the driver, before any worker starts, as one console line naming the stage, the shard and the
    fix; doing what it says (`pretrain shard CONFIG`) rebuilds the damaged cache entry, and the run
    then goes on from the train stage."""
    workdir, _, _ = two_runs
    config_args = [PRESET, f"run.workdir={workdir}", "run.name=broken", *TINY, "data.max_documents=60"]
    for stage in ("tokenizer", "shard"):
        assert pretrain("run", *config_args, "--only", stage).returncode == 0
    run_dir = workdir / "runs" / "broken"
    shard_dir = Path(run_state(run_dir)["shard"]["path"])
    shard = shard_dir / json.loads((shard_dir / "index.json").read_text())["splits"]["train"]["shards"][0]["file"]
    intact = shard.read_bytes()
    data = bytearray(intact)
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = pretrain("run", *config_args, "--from", "train")
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()  # no Ray or worker traceback on the console
    assert line.startswith("error: stage `train` failed:") and f"shard {shard.name} fails its sha256 check" in line
    assert "rebuild it with `pretrain shard CONFIG`" in line and "artifacts of earlier stages are kept" in line
    assert "Traceback" in (run_dir / "logs" / "train-error.txt").read_text()
    state = run_state(run_dir)
    assert state["shard"]["status"] == "done" and state["train"]["status"] == "failed" and "eval" not in state

    rebuilt = pretrain("shard", *config_args)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "is damaged" in rebuilt.stdout and shard.read_bytes() == intact
    resumed = pretrain("run", *config_args, "--from", "train")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [run_state(run_dir)[stage]["status"] for stage in STAGES] == ["done"] * 4


def test_sigterm_during_training_checkpoints_and_stops_then_resume_finishes(two_runs, tmp_path):
    workdir, _, _ = two_runs
    run_dir = workdir / "runs" / "stopped"
    process = start_pretrain(
        "run",
        PRESET,
        f"run.workdir={workdir}",
        "run.name=stopped",
        *TINY,
        "train.max_steps=400",
        "train.checkpoint_every=1000",
        log=tmp_path / "run.log",
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 2
    log = (tmp_path / "run.log").read_text()
    assert "run stopped on request at step" in log and f"pretrain resume {run_dir}" in log
    state = run_state(run_dir)
    assert state["train"]["status"] == "stopped" and "eval" not in state
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert 0 < stopped_at < 400
    client, run = mlflow_run(workdir, run_dir)
    assert run.info.status == "KILLED"

    # The README's resume command, on another world size: the global batch follows it (it was derived).
    resumed = pretrain("resume", str(run_dir), "train.max_steps=" + str(stopped_at + 4), "cluster.num_workers=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped_at:08d}'}" in resumed.stdout + resumed.stderr
    assert [run_state(run_dir)[stage]["status"] for stage in STAGES] == ["done"] * 4
    assert run_state(run_dir)["train"]["figures"]["world_size"] == 1
    client, run = mlflow_run(workdir, run_dir)
    assert run.info.status == "FINISHED"


def test_sigusr1_outside_training_is_reported_not_fatal():
    said = []
    with checkpoint_requests_outside_training(said.append):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)  # the handler runs between bytecodes of the main thread
    assert said == ["SIGUSR1 outside training: no checkpoint to write, continuing"]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def wait_for_training(process: subprocess.Popen, run_dir: Path, log: Path) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def test_one_run_per_directory_and_ctrl_c_checkpoints_then_a_refused_resume_writes_nothing(two_runs, tmp_path):
    """What a user does: start a run, start it again by mistake (refused at once, naming the holder),
    press Ctrl-C (a checkpoint, then status 130 and how to continue), resume with a change that is
    refused (config.yaml stays byte-identical), then with an allowed one (recorded and applied)."""
    workdir, _, _ = two_runs
    run_dir = workdir / "runs" / "interrupted"
    args = ("run", PRESET, f"run.workdir={workdir}", "run.name=interrupted", *TINY, "train.max_steps=400")
    process = start_pretrain(*args, "train.checkpoint_every=1000", log=tmp_path / "run.log")
    wait_for_training(process, run_dir, tmp_path / "run.log")

    second = pretrain(*args, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: {run_dir} is in use by pid {process.pid} on {socket.gethostname()}, which is running this run; "
        "wait for it to end or stop it (a run directory holds one run at a time; use another run.name for a "
        "second run)"
    ]

    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert code == 130, log[-4000:]
    assert "interrupt: writing a checkpoint within train.log_every steps, then stopping" in log
    assert "interrupted: run interrupted (Ctrl-C) at step" in log and f"`pretrain resume {run_dir}`" in log
    assert "Traceback" not in log
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert 0 < stopped_at < 400
    assert mlflow_run(workdir, run_dir)[1].info.status == "KILLED"

    config_before = (run_dir / "config.yaml").read_bytes()
    refused = pretrain("resume", str(run_dir), "model.d_model=32", "train.max_steps=100")
    assert refused.returncode == 2 and refused.stderr.startswith("error: model.d_model: ")
    assert (run_dir / "config.yaml").read_bytes() == config_before
    plain = pretrain("resume", str(run_dir), f"train.max_steps={stopped_at + 2}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "train.max_steps=100" not in (run_dir / "config.yaml").read_text()
    history = json.loads((run_dir / "config_history.json").read_text())
    assert history[-1]["changes"] == {"train.max_steps": [400, stopped_at + 2]}
    client, run = mlflow_run(workdir, run_dir)
    assert run.info.status == "FINISHED" and run.data.tags["config.train.max_steps"] == str(stopped_at + 2)
    assert "config_history.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_ranks_orphaned_by_a_killed_driver_write_no_checkpoint(two_runs, tmp_path):
    workdir, _, _ = two_runs
    run_dir = workdir / "runs" / "orphaned"
    log = tmp_path / "run.log"
    process = start_pretrain(
        "run",
        PRESET,
        f"run.workdir={workdir}",
        "run.name=orphaned",
        *TINY,
        "train.max_steps=400",
        "train.checkpoint_every=1",
        log=log,
    )
    wait_for_training(process, run_dir, log)
    process.kill()
    killed_at = time.time()
    process.wait()
    time.sleep(15)  # Ray notices the dead driver within seconds; its workers must not checkpoint meanwhile
    late = [p.name for p in (run_dir / "checkpoints").glob("step-*") if p.stat().st_mtime > killed_at + 1]
    assert not late, f"checkpoints written after the driver died: {late}"


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_once_there_is_room(two_runs, tmp_path):
    """The run directory's filesystem fills up (another process ate the space) between two checkpoints:
    one line naming the checkpoint, the bytes free and needed, and the fix; status 2; `latest` stays on
    the last good checkpoint; no library traceback or logging error on the console. Freeing the space
    and resuming, as the line says, finishes the run."""
    workdir, _, _ = two_runs
    run_dir = workdir / "runs" / "full"
    run_dir.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(run_dir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        log = tmp_path / "run.log"
        args = (f"run.workdir={workdir}", "run.name=full", *TINY, "train.max_steps=400", "train.checkpoint_every=5")
        process = start_pretrain("run", PRESET, *args, log=log)
        latest, deadline = run_dir / "checkpoints" / "latest", time.monotonic() + 300
        while not latest.exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        filler = run_dir / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(run_dir).free - 50_000))
        assert process.wait(timeout=300) == 2
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1, log.read_text()[-4000:]
        assert "writing checkpoint" in errors[0] and "bytes free there, a checkpoint needs about" in errors[0]
        assert "Free space or lower train.keep_checkpoints" in errors[0]
        assert "Logging error" not in log.read_text() and "Traceback" not in log.read_text()
        kept = latest.read_text().strip()
        assert (run_dir / "checkpoints" / kept / "COMPLETE").is_file()

        filler.unlink()
        resumed = pretrain("resume", str(run_dir), f"train.max_steps={int(kept.removeprefix('step-')) + 2}")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {run_dir / 'checkpoints' / kept}" in resumed.stdout + resumed.stderr
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=True)


def test_validation_loss_is_close_to_the_loss_on_unseen_training_windows(two_runs):
    """The eval stage's val_loss measures what the model does on text it has not trained on: it is
    close to its loss on training windows the run has not reached yet (the demo's gap was 2.7 vs 4.7
    when validation scored the first windows of a split full of generated codec tables)."""
    import numpy as np

    from pipeline.config import load_config
    from pipeline.data.loader import TokenDataset, epoch_sample_table, target_counts, windows_per_source
    from pipeline.eval.export import load_checkpoint_model
    from pipeline.eval.validation import WindowSet, scoring_for, validate

    workdir, _, _ = two_runs
    run_dir = workdir / "runs" / "first"
    config = load_config(run_dir / "config.yaml")
    model, _ = load_checkpoint_model(config, run_dir)
    train = TokenDataset(run_state(run_dir)["shard"]["path"], "train")
    per_source = windows_per_source(train, config.train.seq_len, config.train.seq_len + 1)
    table = epoch_sample_table(
        per_source, target_counts(per_source, train.weights, train.source_names()), config.run.seed, 0, True
    )
    consumed = MAX_STEPS * config.train.global_batch_size
    unseen = np.sort(np.unique(table[consumed:]))[:: max(1, len(table[consumed:]) // 256)]
    starts = np.concatenate([[0], np.cumsum(per_source)])
    windows = WindowSet(unseen, np.searchsorted(starts, unseen, side="right") - 1, starts)
    sums = validate(model, train, windows, scoring_for(config, train), micro_batch_size=16)
    val_loss = json.loads((run_dir / "eval" / "report.json").read_text())["metrics"]["val_loss"]
    assert val_loss == pytest.approx(sums.loss(), rel=0.1), (val_loss, sums.loss())
