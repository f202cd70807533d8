"""Every change a resume allows takes effect: one resumed run changes all of them at once, and one test
per key reads the value the run logged or the optimizer holds (DeepSpeed restores the optimizer's param
groups and the scheduler's base learning rates from the checkpoint; the loop must override them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.tracking.journal import jsonl_records
from pipeline.tracking.names import METRIC_VAL_LOSS
from pipeline.training import checkpoint
from pipeline.training.schedule import lr_multiplier
from tests.pipeline.training.test_train import losses, make_run_dir, train_with_torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BASE = ["train.zero_stage=2", "train.checkpoint_every=0", "train.eval_every=0"]
CHANGED = {
    "train.max_steps": 18,
    "train.lr": 0.01,
    "train.schedule": "wsd",
    "train.decay_fraction": 0.5,
    "train.decay_shape": "1-sqrt",
    "train.min_lr_ratio": 0.5,
    "train.warmup_steps": 4,
    "train.weight_decay": 0.05,
    "train.beta1": 0.8,
    "train.beta2": 0.9,
    "train.adam_eps": 1e-6,
    "train.grad_clip": 0.5,
    "train.log_every": 4,
    "train.eval_every": 3,
    "train.checkpoint_every": 4,
}


@pytest.fixture(scope="module")
def resumed(tiny_shard_dir, tmp_path_factory) -> tuple[Path, str]:
    """A 10-step ZeRO-2 run, then resumed to 18 steps with every allowed optimizer and cadence key changed."""
    root = tmp_path_factory.mktemp("resume")
    run_dir = make_run_dir(root / "run", BASE)
    train_with_torchrun(run_dir, tiny_shard_dir, root / "tmp")
    assert checkpoint.latest_tag(run_dir) == "step-00000010"
    make_run_dir(run_dir, [*BASE, *(f"{key}={value}" for key, value in CHANGED.items())])
    output = train_with_torchrun(run_dir, tiny_shard_dir, root / "tmp")
    return run_dir, output


def applied_tags(run_dir: Path) -> dict:
    tags = {}
    for _, op in jsonl_records(run_dir / "mlflow_ops.jsonl"):
        if op.get("op") == "tags":
            tags.update(op["tags"])
    return tags


def logged_lr(run_dir: Path) -> dict[int, float]:
    return {step: value for step, value in losses(run_dir, "train/lr").items() if step > 10}


@pytest.mark.parametrize(
    "key", ["train.lr", "train.schedule", "train.min_lr_ratio", "train.warmup_steps", "train.decay_fraction"]
)
def test_learning_rate_and_schedule_changes_reach_the_logged_lr(resumed, key):
    run_dir, output = resumed
    assert f"resume: {key} changed from" in output
    lr = logged_lr(run_dir)
    assert sorted(lr) == [12, 16, 18]  # every 4 steps, and the last, shorter window
    train = load_config(run_dir / "config.yaml").train
    for step, value in lr.items():  # the value logged at step s is the lr of optimizer step s-1 (0-based)
        assert value == pytest.approx(0.01 * lr_multiplier(step - 1, train), rel=1e-6), step
    # WSD over 18 steps: the peak until step 9, then 1-sqrt decay to 0.5 x lr over the last 9 steps.
    assert lr[12] == pytest.approx(0.01 * (0.5 + 0.5 * (1 - (2 / 9) ** 0.5)), rel=1e-6)
    assert lr[18] == pytest.approx(0.01 * (0.5 + 0.5 * (1 - (8 / 9) ** 0.5)), rel=1e-6)


@pytest.mark.parametrize(
    "key, tag, expected",
    [
        ("train.weight_decay", "weight_decay", 0.05),
        ("train.beta1", "betas", [0.8, 0.9]),
        ("train.beta2", "betas", [0.8, 0.9]),
        ("train.adam_eps", "eps", 1e-6),
        ("train.grad_clip", "grad_clip", 0.5),
        ("train.lr", "peak_lr", 0.01),
    ],
)
def test_optimizer_changes_are_what_the_optimizer_holds(resumed, key, tag, expected):
    run_dir, output = resumed
    assert f"resume: {key} changed from" in output
    assert applied_tags(run_dir)[f"train.applied.{tag}"] == pytest.approx(expected)


def test_cadence_changes_take_effect(resumed):
    run_dir, _ = resumed
    assert sorted(step for step in losses(run_dir) if step > 10) == [12, 16, 18]  # log_every=4, then the flush
    assert sorted(step for step in losses(run_dir, METRIC_VAL_LOSS) if step > 10) == [12, 15, 18]  # eval_every=3
    tags = [p.name for p in checkpoint.complete_checkpoints(run_dir)]
    assert tags == ["step-00000016", "step-00000018"]  # checkpoint_every=4 (12 pruned: keep 2), and the end
    state = checkpoint.read_trainer_state(checkpoint.checkpoints_dir(run_dir) / "step-00000018")
    assert state["config"]["train"]["lr"] == 0.01


def test_resuming_a_finished_run_says_there_is_nothing_left(resumed, tiny_shard_dir, tmp_path):
    run_dir, _ = resumed
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    output = train_with_torchrun(copy, tiny_shard_dir, tmp_path / "tmp")
    assert "nothing left to train: the run finished step 18 of train.max_steps=18" in output
    assert json.loads((copy / "train_result.json").read_text())["steps"] == 18
    make_run_dir(copy, [*BASE, *(f"{key}={value}" for key, value in CHANGED.items()), "train.max_steps=20"])
    train_with_torchrun(copy, tiny_shard_dir, tmp_path / "tmp")  # the fix the line gives
    assert json.loads((copy / "train_result.json").read_text())["steps"] == 20


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, as a user damages them: the rerun goes on from the newest intact checkpoint


def flip_model_byte(tag_dir: Path) -> None:
    [states] = tag_dir.glob("*model_states.pt")
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))


def truncate_optimizer_file(tag_dir: Path) -> None:
    optim = sorted(tag_dir.glob("*optim_states.pt"))[0]
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])


def delete_complete(tag_dir: Path) -> None:
    (tag_dir / checkpoint.COMPLETE).unlink()


@pytest.fixture(scope="module")
def two_checkpoints(tiny_shard_dir, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """A ZeRO-2 run with checkpoints at steps 8 and 10, and the losses of steps 9-14 of that run resumed
    from step 8 (its step-10 checkpoint moved aside by hand)."""
    root = tmp_path_factory.mktemp("damaged")
    run_dir = make_run_dir(root / "base", [*BASE, "train.checkpoint_every=4"])
    train_with_torchrun(run_dir, tiny_shard_dir, root / "tmp")
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["step-00000008", "step-00000010"]
    reference = root / "reference"
    shutil.copytree(run_dir, reference)
    (reference / "checkpoints" / "step-00000010").rename(reference / "checkpoints" / "aside")
    (reference / "checkpoints" / "latest").write_text("step-00000008\n")
    make_run_dir(reference, [*BASE, "train.checkpoint_every=4", "train.max_steps=14"])
    train_with_torchrun(reference, tiny_shard_dir, root / "tmp")
    return run_dir, {step: loss for step, loss in losses(reference).items() if step > 8}


@pytest.mark.parametrize("damage", [flip_model_byte, truncate_optimizer_file, delete_complete])
def test_a_damaged_checkpoint_is_skipped_and_the_run_finishes_as_if_resumed_from_the_one_before(
    two_checkpoints, tiny_shard_dir, tmp_path, damage
):
    base, reference = two_checkpoints
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    damage(run_dir / "checkpoints" / "step-00000010")
    make_run_dir(run_dir, [*BASE, "train.checkpoint_every=4", "train.max_steps=14"])
    output = train_with_torchrun(run_dir, tiny_shard_dir, tmp_path / "tmp")
    assert f"checkpoint {run_dir / 'checkpoints' / 'step-00000010'} is damaged (" in output
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000008'} (step 8" in output
    assert {step: loss for step, loss in losses(run_dir).items() if step > 8} == reference
    assert checkpoint.latest_tag(run_dir) == "step-00000014"
    assert (run_dir / "checkpoints" / "step-00000010.damaged").is_dir()
