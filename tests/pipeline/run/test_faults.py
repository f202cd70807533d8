"""Fault tolerance and bad input, on real processes: 2 CPU ranks, gloo, fp32, DeepSpeed, torchrun and Ray Train.

- a training worker SIGKILLed under Ray Train: the worker group restarts from `latest` by itself;
- a launch killed while a checkpoint is being written, synchronously or in the background: the previous
  checkpoint stays `latest`;
- batches whose loss is not finite: the update is skipped and counted; too many roll back;
- too little disk space, an unwritable run directory, a disk that fills up during a save;
- shards and tokenizer files changed after sharding; checkpoint files that carry pickled code.

The non-finite losses come from real data, no hook: a BERT micro-batch made only of special tokens has
no token to mask, so its mean masked-LM loss is 0/0 = NaN. `poison_shards` writes such micro-batches
into a copy of the tiny BERT shards, on rank 1 only (the ranks must agree on the skip).

References are trained in one torchrun launch (see tests/pipeline/training/test_train.py), and the comparisons
are bit for bit: fp32 on CPU is deterministic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.loader import TokenDataset, epoch_sample_table, target_counts, windows_per_source
from pipeline.data.shards import verify_shards
from pipeline.errors import CheckpointError, DataError, StorageError
from pipeline.run.artifacts import file_sha256
from pipeline.tracking.journal import read_metrics
from pipeline.tracking.names import METRIC_TRAIN_LOSS
from pipeline.training import checkpoint, rng, storage
from tests.pipeline.training import test_train
from tests.pipeline.training.test_train import (
    TINY,
    figures,
    losses,
    make_run_dir,
    torchrun,
    train_with_torchrun,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)

BERT = [
    "model.family=bert",
    "model.norm_position=post",
    "train.eval_every=0",
    "train.max_steps=12",
    "train.keep_checkpoints=5",
]
# Poisoned steps: 6 is skipped (1 bad step allowed), 10 is one too many -> back to the step-8 checkpoint.
POISONED_STEPS = (6, 10)
SKIP_ONE = [*BERT, "train.checkpoint_every=4", "train.max_bad_steps=1"]
RAY_RUN = ["train.max_steps=60", "train.checkpoint_every=10", "train.eval_every=0"]
CRASH_RUN = ["model.d_model=64", "train.max_steps=40", "train.checkpoint_every=2", "train.eval_every=0"]
DISK_RUN = ["train.max_steps=20", "train.checkpoint_every=5", "train.eval_every=0", "train.keep_checkpoints=1"]
SAMPLES_PER_STEP = 16  # TINY: micro-batch 8 x 2 ranks


# ---------------------------------------------------------------------------------------------
# Helpers


def poison_shards(shard_dir: Path, out: Path, steps: tuple[int, ...], overrides: list[str]) -> Path:
    """A copy of shard_dir in which every micro-batch of each of `steps` (epoch 0, no accumulation) holds
    only the separator token, with index.json's checksums updated: a consistent, bad corpus. BERT masks no
    special token, so those steps have no target token on any rank: their loss, nats over zero tokens,
    is not finite (one rank's empty micro-batch alone is fine: the loss is weighted over the step)."""
    shutil.copytree(shard_dir, out)
    config = load_config(None, [*TINY, *overrides])
    t, dataset = config.train, TokenDataset(out, "train")
    windows = windows_per_source(dataset, t.seq_len, t.seq_len)  # BERT windows: seq_len tokens
    table = epoch_sample_table(
        windows, target_counts(windows, dataset.weights, dataset.source_names()), config.run.seed, 0, True
    )
    offsets = np.concatenate([[0], np.cumsum(windows)])
    for step in steps:
        first = (step - 1) * SAMPLES_PER_STEP  # both ranks' micro-batches of the step
        for window in table[first : first + SAMPLES_PER_STEP]:
            source = int(np.searchsorted(offsets, window, side="right")) - 1
            _overwrite(
                dataset, source, int(window - offsets[source]) * t.seq_len, t.seq_len, dataset.index["separator_id"]
            )
    index = json.loads((out / "index.json").read_text())
    for shard in index["splits"]["train"]["shards"]:
        shard["sha256"] = file_sha256(out / shard["file"])
    (out / "index.json").write_text(json.dumps(index))
    return out


def _overwrite(dataset: TokenDataset, source: int, start: int, length: int, token: int) -> None:
    stream = dataset.streams[source]
    for shard, path in enumerate(stream.paths):
        low, high = max(start, stream.starts[shard]), min(start + length, stream.starts[shard + 1])
        if low < high:
            tokens = np.memmap(path, dtype=stream.dtype, mode="r+")
            tokens[low - stream.starts[shard] : high - stream.starts[shard]] = token
            tokens.flush()


def records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def first_pass_losses(run_dir: Path) -> dict[int, float]:
    """Losses logged before the first rollback (later records re-log the steps after the checkpoint)."""
    result = {}
    for record in records(run_dir):
        if "train/rollbacks" in record["metrics"]:
            break
        if METRIC_TRAIN_LOSS in record["metrics"]:
            result[record["step"]] = record["metrics"][METRIC_TRAIN_LOSS]
    return result


def branch_from(source: Path, tag_step: int, run_dir: Path, overrides: list[str], samples_consumed: int) -> Path:
    """A new run directory resuming from `source`'s checkpoint of tag_step, with the loader moved to
    samples_consumed: what a skip or a rollback should be equivalent to."""
    tag = checkpoint.tag_for(tag_step)
    make_run_dir(run_dir, overrides)
    shutil.copytree(checkpoint.checkpoints_dir(source) / tag, checkpoint.checkpoints_dir(run_dir) / tag)
    state_file = checkpoint.checkpoints_dir(run_dir) / tag / checkpoint.TRAINER_STATE
    state = json.loads(state_file.read_text())
    state["loader"]["samples_consumed"] = samples_consumed
    state_file.write_text(json.dumps(state))
    files = checkpoint.file_digests(state_file.parent)  # a deliberate edit: record the new checksums
    (state_file.parent / checkpoint.CHECKSUMS).write_text(json.dumps({"files": files}))
    (checkpoint.checkpoints_dir(run_dir) / checkpoint.LATEST).write_text(tag + "\n")
    return run_dir


def launch_processes(process: subprocess.Popen) -> list[psutil.Process]:
    agent = psutil.Process(process.pid)
    return [agent, *agent.children(recursive=True)]


def train_runs(runs: dict[str, tuple[Path, Path]], tmp: Path) -> None:
    """Train several run directories one after another in one 2-rank torchrun launch."""
    process = torchrun(2, [test_train.__file__, *(f"{run}={shards}" for run, shards in runs.values())], tmp)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-6000:]


def failing_run(run_dir: Path, shards: Path, tmp: Path) -> str:
    """A launch expected to fail with a one-line error (exit code 2 of the workers, 1 of torchrun)."""
    process = torchrun(2, ["-m", "pipeline.training", "--run-dir", str(run_dir), "--shards", str(shards)], tmp)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1 and "exitcode  : 2" in output, output[-4000:]
    return output


@pytest.fixture(scope="module")
def poisoned(tiny_bert_shard_dir, tmp_path_factory) -> Path:
    return poison_shards(tiny_bert_shard_dir, tmp_path_factory.mktemp("poisoned") / "shards", POISONED_STEPS, BERT)


@pytest.fixture(scope="module")
def trained(tiny_shard_dir, tiny_bert_shard_dir, poisoned, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted references and the poisoned runs, in one torchrun launch: {name: run_dir}."""
    root = tmp_path_factory.mktemp("fault-runs")
    runs = {
        "crash_reference": (make_run_dir(root / "crash", CRASH_RUN), tiny_shard_dir),
        "disk_reference": (make_run_dir(root / "disk", DISK_RUN), tiny_shard_dir),
        "clean": (make_run_dir(root / "clean", [*BERT, "train.checkpoint_every=5"]), tiny_bert_shard_dir),
        "poisoned": (make_run_dir(root / "poisoned", SKIP_ONE), poisoned),
        "poisoned_zero2": (make_run_dir(root / "poisoned_zero2", [*SKIP_ONE, "train.zero_stage=2"]), poisoned),
    }
    train_runs(runs, root / "tmp")
    return {name: run for name, (run, _) in runs.items()}


@pytest.fixture(scope="module")
def branches(trained, poisoned, tmp_path_factory) -> dict[str, Path]:
    """What a skip and a rollback must equal: resumes from the same checkpoints with the loader moved
    past the bad batch."""
    root = tmp_path_factory.mktemp("branches")
    # Step 6 skipped: the model after step 6 is the model after step 5, the data continues with batch 7.
    skip = branch_from(trained["clean"], 5, root / "skip", SKIP_ONE, 6 * SAMPLES_PER_STEP)
    # Rolled back at step 10 to step 8: the data continues with batch 11.
    rollback = branch_from(trained["poisoned"], 8, root / "rollback", SKIP_ONE, 10 * SAMPLES_PER_STEP)
    train_runs({"skip": (skip, poisoned), "rollback": (rollback, poisoned)}, root / "tmp")
    return {"skip": skip, "rollback": rollback}


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh 4 MiB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


# ---------------------------------------------------------------------------------------------
# 1. A worker dies under Ray Train


def kill_a_training_worker(run_dir: Path, killed: list[int]) -> None:
    """Two steps after the first checkpoint, SIGKILL one Ray Train worker of this test's own Ray (the
    test process's descendants: other Ray instances on the machine are not touched)."""
    deadline = time.monotonic() + 300
    while (
        not (checkpoint.checkpoints_dir(run_dir) / checkpoint.LATEST).exists()
        or max(losses(run_dir), default=0)
        < checkpoint.read_trainer_state(checkpoint.checkpoints_dir(run_dir) / checkpoint.latest_tag(run_dir))["step"]
        + 2
    ):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    workers = [p for p in psutil.Process().children(recursive=True) if _name(p) == "ray::RayTrainWorker"]
    if len(workers) == 2:
        workers[1].kill()
        killed.append(workers[1].pid)


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.slow
def test_worker_killed_under_ray_train_restarts_from_the_latest_checkpoint(tiny_shard_dir, tmp_path):
    """The reference is an uninterrupted Ray Train run: torchrun's launch reduces gradients through
    DeepSpeed's own CPU all-reduce, Ray's through gloo, which round differently in the last bit."""
    from pipeline.run.runtime import ray_connection
    from pipeline.training.ray_train import run_training

    overrides = [*RAY_RUN, "cluster.max_failures=1"]
    config = load_config(None, [*TINY, *overrides])
    run_dir, killed = make_run_dir(tmp_path / "run", overrides), []
    with ray_connection(config):
        run_training(config, tiny_shard_dir, make_run_dir(tmp_path / "reference", overrides))
        killer = threading.Thread(target=kill_a_training_worker, args=(run_dir, killed), daemon=True)
        killer.start()
        result = run_training(config, tiny_shard_dir, run_dir)
        killer.join()
    assert len(killed) == 1 and not psutil.pid_exists(killed[0])
    resumed_from = result.figures["resumed_from_step"]
    assert result.steps == 60 and resumed_from in range(10, 60, 10)
    steps = [r["step"] for r in records(run_dir) if METRIC_TRAIN_LOSS in r["metrics"]]
    restart = [i for i, step in enumerate(steps) if step == resumed_from + 1][1]  # trained again
    assert max(steps[:restart]) >= resumed_from + 2  # the kill came after these steps
    assert losses(run_dir) == losses(tmp_path / "reference")


# ---------------------------------------------------------------------------------------------
# 2. Killed while writing a checkpoint


def freeze_while_writing(process: subprocess.Popen, run_dir: Path) -> tuple[Path, list[psutil.Process]]:
    """Stop every process of the launch at a moment when a checkpoint directory exists without its
    COMPLETE marker and an earlier checkpoint is `latest`; returns that directory and the processes."""
    root = checkpoint.checkpoints_dir(run_dir)
    while True:
        latest = checkpoint.latest_tag(run_dir) if (root / checkpoint.LATEST).exists() else None
        partial = [p for p in root.glob("step-*") if latest and p.name > latest and not (p / "COMPLETE").exists()]
        if partial:
            processes = launch_processes(process)
            for p in processes:
                p.suspend()
            if partial[0].is_dir() and not (partial[0] / checkpoint.COMPLETE).exists():
                return partial[0], processes
            for p in processes:  # it completed meanwhile: wait for the next one
                p.resume()
        assert process.poll() is None, "the run finished before a checkpoint write could be caught"
        time.sleep(0.001)


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(asynchronous, trained, tiny_shard_dir, tmp_path):
    """Async: the kill comes between the snapshot and the seal (files being written in the background,
    or written and not yet sealed), the window an asynchronous save adds."""
    run_dir = make_run_dir(tmp_path / "run", [*CRASH_RUN, f"train.async_checkpoint={str(asynchronous).lower()}"])
    process = torchrun(
        2, ["-m", "pipeline.training", "--run-dir", str(run_dir), "--shards", str(tiny_shard_dir)], tmp_path / "tmp"
    )
    partial, processes = freeze_while_writing(process, run_dir)
    for p in processes:
        p.kill()
    process.communicate()
    latest = checkpoint.latest_tag(run_dir)  # raises unless it names a complete checkpoint
    assert latest < partial.name and partial.is_dir() and not (partial / checkpoint.COMPLETE).exists()
    previous = checkpoint.checkpoints_dir(run_dir) / latest

    output = train_with_torchrun(run_dir, tiny_shard_dir, tmp_path / "tmp")
    assert f"resumed from {previous} " in output
    assert figures(run_dir)["resumed_from_step"] == int(latest.removeprefix("step-"))
    assert losses(run_dir) == losses(trained["crash_reference"])
    assert all((p / checkpoint.COMPLETE).exists() for p in checkpoint.checkpoints_dir(run_dir).glob("step-*"))


# ---------------------------------------------------------------------------------------------
# 3. Non-finite losses


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_too_many_roll_back(trained, branches):
    run = trained["poisoned"]
    by_step = {}
    for record in records(run):
        by_step.setdefault(record["step"], {}).update(record["metrics"])
    clean = losses(trained["clean"])
    assert {s: v for s, v in first_pass_losses(run).items() if s < 6} == {s: clean[s] for s in range(1, 6)}
    # Step 6: no loss logged (no update), counted; the next steps equal a run that never saw batch 6.
    assert METRIC_TRAIN_LOSS not in by_step[6] and by_step[6]["train/skipped_steps"] == 1
    skip = losses(branches["skip"])
    assert [first_pass_losses(run)[s] for s in (7, 8, 9)] == [skip[s] for s in (6, 7, 8)]
    # Step 10: the second bad step within the window rolls back to step 8, the data goes on with batch 11.
    assert by_step[10]["train/rollbacks"] == 1 and by_step[10]["train/skipped_steps"] == 2
    rollback = losses(branches["rollback"])
    assert {s: losses(run)[s] for s in range(9, 13)} == {s: rollback[s] for s in range(9, 13)}
    state = checkpoint.read_trainer_state(checkpoint.checkpoints_dir(run) / checkpoint.latest_tag(run))
    assert state["step"] == 12 and state["skipped_steps"] == 2 and state["rollbacks"] == 1
    assert state["loader"]["samples_consumed"] == 14 * SAMPLES_PER_STEP  # 12 steps + 2 batches thrown away
    assert all(np.isfinite(v) for v in losses(run).values())


@pytest.mark.slow
def test_zero2_skips_and_rolls_back_like_zero0(trained):
    """At ZeRO 2 DeepSpeed's own overflow check skips the step; at ZeRO 0 pipeline/training/engine.py does."""
    zero0, zero2 = trained["poisoned"], trained["poisoned_zero2"]
    test_train.assert_close(losses(zero2), losses(zero0), rel=1e-5)
    assert [r["metrics"].get("train/rollbacks") for r in records(zero2)] == [
        r["metrics"].get("train/rollbacks") for r in records(zero0)
    ]


@pytest.mark.slow
def test_too_many_bad_steps_without_a_checkpoint_fail_clearly(poisoned, tmp_path):
    run_dir = make_run_dir(tmp_path / "run", [*BERT, "train.checkpoint_every=0", "train.max_bad_steps=0"])
    output = failing_run(run_dir, poisoned, tmp_path / "tmp")
    assert (
        "error: step 6: 1 of the last 100 steps had a non-finite loss or gradient (train.max_bad_steps=0) "
        "and no checkpoint to roll back to; lower train.lr"
    ) in output
    assert max(losses(run_dir)) == 5


# ---------------------------------------------------------------------------------------------
# 4. Storage


def test_storage_check_names_directory_bytes_and_fix(tmp_path):
    free, root = shutil.disk_usage(tmp_path).free, checkpoint.checkpoints_dir(tmp_path)
    storage.check_storage(root, checkpoint_bytes=free // 10, keep=2, existing=0)  # 3 x 10% fits
    with pytest.raises(StorageError) as error:
        storage.check_storage(root, checkpoint_bytes=free // 2, keep=2, existing=0)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'checkpoints'} has ") and "\n" not in message
    needed = int(message.split("needs about ")[1].split()[0].replace(",", ""))
    assert needed == 3 * (free // 2) and "lower train.keep_checkpoints" in message
    # Complete checkpoints already on disk count as written: two kept, one more to write.
    storage.check_storage(root, checkpoint_bytes=free // 2, keep=2, existing=2)


def test_unwritable_run_dir_is_refused_before_ray_starts(tiny_shard_dir, tmp_path):
    from pipeline.training.ray_train import run_training

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only filesystem
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(run_dir / "checkpoints")], check=True)
    else:
        (run_dir / "checkpoints").chmod(0o500)
    try:
        started = time.monotonic()
        with pytest.raises(
            StorageError,
            match=rf"^{re.escape(str(run_dir / 'checkpoints'))} cannot be created or written "
            r"\(.+\); make it writable or set run.workdir to a writable directory$",
        ):
            run_training(load_config(None, TINY), tiny_shard_dir, run_dir)
        assert time.monotonic() - started < 10  # no Ray, no workers
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(run_dir / "checkpoints")], check=True)


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_latest_and_resumes(trained, tiny_shard_dir, tmpfs, tmp_path):
    run_dir = make_run_dir(tmpfs / "run", DISK_RUN)
    args = ["-m", "pipeline.training", "--run-dir", str(run_dir), "--shards", str(tiny_shard_dir)]
    process = torchrun(2, args, tmp_path / "tmp")
    wait_for(lambda: (checkpoint.checkpoints_dir(run_dir) / checkpoint.LATEST).exists(), process)
    processes = launch_processes(process)
    for p in processes:  # fill the disk between two checkpoints: another process ate the space
        p.suspend()
    assert checkpoint.latest_tag(run_dir) == "step-00000005"
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(tmpfs).free - 100_000))
    for p in processes:
        p.resume()
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"error: writing checkpoint {checkpoint.checkpoints_dir(run_dir) / 'step-00000010'} failed (" in output, (
        output[-8000:]
    )
    assert "the last good checkpoint step-00000005 is kept as `latest`" in output
    assert checkpoint.latest_tag(run_dir) == "step-00000005"
    assert not (checkpoint.checkpoints_dir(run_dir) / "step-00000010" / checkpoint.COMPLETE).exists()

    filler.unlink()
    train_with_torchrun(run_dir, tiny_shard_dir, tmp_path / "tmp")
    assert figures(run_dir)["resumed_from_step"] == 5
    assert losses(run_dir) == losses(trained["disk_reference"])


# ---------------------------------------------------------------------------------------------
# 5. Data changed after sharding (truncated, flipped and missing shards: tests/pipeline/test_data.py)


def test_edited_or_missing_tokenizer_file_is_refused_naming_it(tiny_shard_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shard_dir, copy)
    tokenizer_json = copy / "tokenizer" / "tokenizer.json"
    assert "tokenizer.json" in json.loads((copy / "index.json").read_text())["tokenizer_sha256"]
    verify_shards(copy, verify_checksums=False)
    tokenizer_json.write_text(tokenizer_json.read_text() + " ")  # still valid JSON, other bytes
    with pytest.raises(DataError, match=rf"^tokenizer file {re.escape(str(tokenizer_json))} was changed after"):
        verify_shards(copy, verify_checksums=False)
    tokenizer_json.unlink()
    with pytest.raises(DataError, match=rf"^tokenizer file {re.escape(str(tokenizer_json))} is missing"):
        verify_shards(copy, verify_checksums=False)


@pytest.mark.slow
def test_training_refuses_changed_data_before_the_first_step(tiny_shard_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shard_dir, copy)
    shard = copy / json.loads((copy / "index.json").read_text())["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    run_dir = make_run_dir(tmp_path / "run", [])
    output = failing_run(run_dir, copy, tmp_path / "tmp")
    assert f"error: shard {shard.name} has {shard.stat().st_size} bytes but index.json says" in output
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_checksums_are_verified_by_one_rank_while_the_others_wait(tiny_shard_dir, tmp_path):
    """A flipped byte keeps the sizes every rank checks, so only the rank that hashes can see it: the
    error comes once, from rank 0, and rank 1 never reaches a step."""
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shard_dir, copy)
    shard = copy / json.loads((copy / "index.json").read_text())["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    run_dir = make_run_dir(tmp_path / "run", ["data.verify_checksums=true"])
    output = failing_run(run_dir, copy, tmp_path / "tmp")
    assert output.count(f"shard {shard.name} fails its sha256 check") == 1, output[-4000:]
    assert not (run_dir / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# 6. Checkpoints that carry code


class Payload:
    """Unpickling this runs `touch MARKER`: what a tampered checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_rng_state_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    state_file = tmp_path / "rng" / "rank-00000.pt"
    state_file.parent.mkdir()
    torch.save({"torch": Payload(marker)}, state_file)
    with pytest.raises(Exception, match="Weights only load failed"):
        rng.load_rng_state(tmp_path, 0)
    assert not marker.exists()


@pytest.mark.slow
def test_checkpoint_with_pickled_code_is_refused_by_every_loader(trained, tiny_bert_shard_dir, tmp_path):
    from pipeline.training.engine import consolidated_state_dict, verify_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained["clean"], run_dir)
    tag = checkpoint.latest_tag(run_dir)
    states = checkpoint.checkpoints_dir(run_dir) / tag / "mp_rank_00_model_states.pt"
    verify_checkpoint(states.parent)  # DeepSpeed's own checkpoint passes
    consolidated_state_dict(checkpoint.checkpoints_dir(run_dir), tag)
    marker = tmp_path / "ran"
    saved = torch.load(states, weights_only=False)
    torch.save({**saved, "extra": Payload(marker)}, states)
    with pytest.raises(CheckpointError, match=rf"^refusing to load {re.escape(str(states))}: it pickles posix.system"):
        consolidated_state_dict(checkpoint.checkpoints_dir(run_dir), tag)
    # A tamperer who also rewrites checksums.json gets past the checksums; the pickle check still refuses.
    files = checkpoint.file_digests(states.parent)
    (states.parent / checkpoint.CHECKSUMS).write_text(json.dumps({"files": files}))
    make_run_dir(run_dir, [*BERT, "train.checkpoint_every=5", "train.max_steps=14"])
    output = failing_run(run_dir, tiny_bert_shard_dir, tmp_path / "tmp")
    assert f"error: refusing to load {states}" in output
    assert not marker.exists()


@pytest.mark.slow
def test_a_user_error_on_a_ray_train_worker_is_one_line_with_its_traceback_in_logs(poisoned, tmp_path, capfd):
    """TrainingDiverged raised on both ranks of a Ray Train worker group reaches the driver as the same
    UserError (what the CLI prints as one line); the console shows no worker traceback and the rank's
    traceback is in the run's logs/."""
    from launch import console
    from pipeline.errors import TrainingDiverged
    from pipeline.training.ray_train import run_training

    console.setup()  # the `pretrain` command's console policy
    overrides = [*BERT, "train.checkpoint_every=0", "train.max_bad_steps=0"]
    run_dir = make_run_dir(tmp_path / "run", overrides)
    with pytest.raises(TrainingDiverged, match=r"^step 6: 1 of the last 100 steps had a non-finite loss"):
        run_training(load_config(None, [*TINY, *overrides]), poisoned, run_dir)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "RayTrainWorker" not in out + err, (out + err)[-3000:]
    assert [line for line in out.splitlines() if not line.startswith("step ")] == []
    assert "TrainingDiverged" in (run_dir / "logs" / "train-rank0-error.txt").read_text()
