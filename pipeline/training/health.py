"""Non-finite steps and rollback.

A step whose loss or reduced gradients are not finite on any rank is skipped (no update, no scheduler
step; see pipeline/training/engine.py) and counted (`train/skipped_steps`); the loader moves on. More than
train.max_bad_steps of them within train.bad_step_window steps roll the run back to the latest
checkpoint (weights, optimizer, RNG, step) while the loader keeps its position, so training continues
with the data after the bad batch (`train/rollbacks`, logged at the step that triggered it). The
checkpoint is verified first (damaged ones are skipped). A rollback that would return to the checkpoint
the previous one returned to falls back to the one before it: that checkpoint is the likely cause.
Without a checkpoint to return to, training stops with TrainingDiverged naming the cause.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import TrainingDiverged
from pipeline.tracking.names import METRIC_ROLLBACKS
from pipeline.training import engine
from pipeline.training.checkpoint import (
    checkpoints_dir,
    fall_back_from,
    latest_tag,
    load_state,
    read_trainer_state,
    select_intact,
)
from pipeline.training.run import Callback, Run, StepOutcome


def step_was_bad(model_engine, precision: str, loss: torch.Tensor) -> bool:
    """Whether the step's update was skipped for non-finite values; every rank gets the same answer,
    as the skip is decided on all-reduced gradients. fp16's loss scaler also skips steps that overflow
    only because its scale is too high, which is routine: those count only if some rank's loss was
    non-finite (one more all-reduce, on skipped fp16 steps only)."""
    if engine.step_applied(model_engine):
        return False
    if precision != "fp16":
        return True
    bad = (~torch.isfinite(loss)).to(torch.int32)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


class StepHealth(Callback):
    """Bad (skipped) steps within the last `window` steps, the run's totals of skips and rollbacks, and
    the rollback itself (the first callback of the loop: later ones see `outcome.rolled_back`)."""

    def __init__(self, max_bad_steps: int, window: int):
        self.max_bad_steps, self.window = max_bad_steps, window
        self.recent: deque[int] = deque()
        self.skipped_steps, self.rollbacks = 0, 0
        self.last_target: str | None = None  # the checkpoint the last rollback returned to

    def too_many(self, step: int) -> bool:
        """Count a bad step; True when it makes more than max_bad_steps within the window."""
        self.skipped_steps += 1
        self.recent.append(step)
        while self.recent[0] <= step - self.window:
            self.recent.popleft()
        return len(self.recent) > self.max_bad_steps

    def after_step(self, run: Run, outcome: StepOutcome) -> None:
        if outcome.skipped and self.too_many(run.step):
            self.roll_back(run)
            outcome.rolled_back = True

    def roll_back(self, run: Run) -> None:
        """Log the window, then reload `latest` (engine, RNG, step, tokens) but keep the loader's
        position, so the bad data is not fed again."""
        bad_step, t = run.step, run.config.train
        why = f"{len(self.recent)} of the last {t.bad_step_window} steps had a non-finite loss or gradient"
        tag = self.rollback_target(run)
        if tag is None:
            raise TrainingDiverged(
                f"step {bad_step}: {why} (train.max_bad_steps={t.max_bad_steps}) and no checkpoint to roll back "
                "to; lower train.lr or raise train.warmup_steps, check the data near this step, or checkpoint "
                "more often (train.checkpoint_every)"
            )
        if tag == self.last_target:
            raise TrainingDiverged(
                f"step {bad_step}: {why} again right after rolling back to {tag}, and there is no older intact "
                f"checkpoint: {tag} itself is the likely cause (a damaged optimizer or model state); restore "
                "it from a copy, or rerun with train.verify_checkpoints=true to check its files"
            )
        self.rollbacks += 1
        self.last_target = tag
        run.log(run.flush_meter() | {METRIC_ROLLBACKS: self.rollbacks})
        path = checkpoints_dir(run.run_dir) / tag
        load_state(run, path, read_trainer_state(path), restore_loader=False)
        self.recent.clear()
        if run.rank == 0:
            print(
                f"step {bad_step}: {why}; rolled back to {path} (step {run.step}), continuing with the data "
                "after the bad batch",
                flush=True,
            )

    def rollback_target(self, run: Run) -> str | None:
        """The newest intact checkpoint (rank 0 verifies, moving damaged ones aside). When the last
        rollback returned to that same one and the run went bad again, it is the suspect: the one
        before it, when there is one. Every rank then reads the same `latest`."""
        if run.rank == 0:
            check = run.config.train.verify_checkpoints
            tag = select_intact(run.run_dir, check)
            if tag is not None and tag == self.last_target:
                fall_back_from(run.run_dir, tag, "the run went bad again right after rolling back to it", check)
        dist.barrier()
        return latest_tag(run.run_dir)

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps, self.rollbacks = state.get("skipped_steps", 0), state.get("rollbacks", 0)
