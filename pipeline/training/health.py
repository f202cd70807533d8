"""Non-finite steps and rollback.

A step whose loss or reduced gradients are not finite on any rank is skipped (no update, no scheduler
step; see pipeline/training/engine.py) and counted (`train/skipped_steps`); the loader moves on. More than
train.max_bad_steps of them within train.bad_step_window steps roll the run back to the latest
checkpoint (weights, optimizer, RNG, step) while the loader keeps its position, so training continues
with the data after the bad batch (`train/rollbacks`, logged at the step that triggered it). Without a
checkpoint to return to, or after MAX_ROLLBACKS_PER_CHECKPOINT rollbacks to the same one, training
stops with TrainingDiverged.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import TrainingDiverged
from pipeline.tracking.names import METRIC_ROLLBACKS
from pipeline.training import engine
from pipeline.training.checkpoint import checkpoints_dir, latest_tag, load_state, read_trainer_state
from pipeline.training.run import Callback, Run, StepOutcome

# Returning to one checkpoint more often than this means the trouble is not a passing bad batch.
MAX_ROLLBACKS_PER_CHECKPOINT = 3


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
        self.rollbacks_to: Counter[str] = Counter()

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
        tag = latest_tag(run.run_dir)
        why = f"{len(self.recent)} of the last {t.bad_step_window} steps had a non-finite loss or gradient"
        if tag is None or self.rollbacks_to[tag] >= MAX_ROLLBACKS_PER_CHECKPOINT:
            where = (
                "no checkpoint to roll back to"
                if tag is None
                else f"already rolled back to {tag} {MAX_ROLLBACKS_PER_CHECKPOINT} times"
            )
            raise TrainingDiverged(
                f"step {bad_step}: {why} (train.max_bad_steps={t.max_bad_steps}) and {where}; "
                "lower train.lr or raise train.warmup_steps, check the data near this step, "
                "or checkpoint more often (train.checkpoint_every)"
            )
        self.rollbacks += 1
        self.rollbacks_to[tag] += 1
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

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps, self.rollbacks = state.get("skipped_steps", 0), state.get("rollbacks", 0)
