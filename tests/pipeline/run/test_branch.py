"""`pretrain branch` end to end (real Ray, 2 DeepSpeed workers, sqlite MLflow): a WSD run decayed early
from a stable-phase checkpoint, a branch onto another data mix, and a refused change."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.tracking.journal import read_metrics
from pipeline.training.schedule import lr_multiplier
from tests.pipeline.run.test_orchestrate import PRESET, TINY, mlflow_run, pretrain

WSD = [*TINY, "train.max_steps=20", "train.schedule=wsd", "train.checkpoint_every=10", "train.log_every=1"]
pytestmark = pytest.mark.slow


def logged(run_dir, name: str) -> dict[int, float]:
    return {r["step"]: r["metrics"][name] for r in read_metrics(run_dir / "metrics.jsonl") if name in r["metrics"]}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("branch")
    done = pretrain("run", PRESET, f"run.workdir={workdir}", "run.name=stable", *WSD)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir, workdir / "runs" / "stable"


def test_a_wsd_run_decayed_early_continues_from_the_parents_step(parent):
    workdir, parent_dir = parent
    done = pretrain("branch", str(parent_dir), "decayed", "--checkpoint", "step-00000010", "train.max_steps=14")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = workdir / "runs" / "decayed"
    assert "branch decayed: from" in done.stdout and "(step 10)" in done.stdout
    losses, lrs = logged(run_dir, "train/loss"), logged(run_dir, "train/lr")
    assert sorted(losses) == [11, 12, 13, 14]  # the steps go on from the parent's
    parent_losses = logged(parent_dir, "train/loss")
    assert losses[11] == pytest.approx(parent_losses[11], rel=1e-5)  # same state, same next batch
    config = load_config(run_dir / "config.yaml")
    for step, lr in lrs.items():  # WSD over 14 steps: the decay starts at once
        assert lr == pytest.approx(config.train.lr * lr_multiplier(step - 1, config.train), rel=1e-6), step
    assert lrs[14] < lrs[13] < lrs[11] == pytest.approx(config.train.lr)  # the parent would hold it to step 16
    _, run = mlflow_run(workdir, run_dir)
    _, parent_run = mlflow_run(workdir, parent_dir)
    assert run.info.run_id != parent_run.info.run_id
    assert run.data.tags["branch.parent_run_id"] == parent_run.info.run_id
    assert run.data.tags["branch.checkpoint"] == "step-00000010"
    assert json.loads((run_dir / "branch.json").read_text())["step"] == 10


def test_a_branch_onto_another_data_mix_keeps_the_tokenizer_and_starts_the_data_fresh(parent, tmp_path):
    workdir, parent_dir = parent
    corpus = tmp_path / "anneal.txt"
    paragraphs = ("\n".join(f"value_{i}_{j} = compute({i}, {j}) * {j}" for j in range(12)) for i in range(400))
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    done = pretrain(
        "branch", str(parent_dir), "annealed", "--checkpoint", "step-00000010", "train.max_steps=12",
        f"data.sources=[{{path: {corpus}, text_unit: paragraph}}]",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "a new data mix, so the data position starts fresh" in done.stdout
    run_dir = workdir / "runs" / "annealed"
    assert sorted(logged(run_dir, "train/loss")) == [11, 12]
    state = json.loads((run_dir / "run.json").read_text())["stages"]
    parent_state = json.loads((parent_dir / "run.json").read_text())["stages"]
    assert state["tokenizer"]["figures"]["vocab_size"] == parent_state["tokenizer"]["figures"]["vocab_size"]
    assert state["shard"]["path"] != parent_state["shard"]["path"]


def test_a_branch_refuses_any_other_change_and_writes_nothing(parent):
    workdir, parent_dir = parent
    done = pretrain("branch", str(parent_dir), "wider", "--checkpoint", "step-00000010", "model.d_model=128")
    assert done.returncode != 0
    line = done.stderr.strip().splitlines()[-1]
    assert "model.d_model: a branch keeps its parent's value (64, not 128)" in line
    assert not (workdir / "runs" / "wider").exists()
    missing = pretrain("branch", str(parent_dir), "other", "--checkpoint", "step-00000007")
    assert "step-00000007: not a complete checkpoint; pick one of" in missing.stderr
