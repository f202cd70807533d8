"""What one rank's training holds (`Run`), what a step hands to the periodic concerns (`StepOutcome`),
and what training returns (`TrainResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.loader import BatchLoader, TokenDataset
from pipeline.eval.validation import WindowSet
from pipeline.tracking.journal import NullSink
from pipeline.training.meter import Meter


@dataclass
class StepOutcome:
    """One optimizer step as the periodic concerns see it. A rollback (the first concern) sets
    `rolled_back`; the others then skip their work for this step."""

    loss: torch.Tensor
    grad_norm: Any
    lr: float
    seconds: float
    skipped: bool
    rolled_back: bool = False


@dataclass
class TrainResult:
    """What training returns to its driver: the figures (logged as the train stage's metrics), whether
    it stopped on request before max_steps, and where its last checkpoint is."""

    figures: dict[str, Any]
    stopped: bool
    steps: int
    checkpoint: str | None
    interrupted: bool = False  # the stop was asked by Ctrl-C (the driver's SIGINT)

    def to_dict(self) -> dict[str, Any]:
        return {"figures": self.figures, "stopped": self.stopped, "steps": self.steps, "checkpoint": self.checkpoint}


@dataclass
class Run:
    """Everything `setup` builds for one rank; `step` and `tokens_seen` advance during training."""

    config: Config
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    engine: Any
    loader: BatchLoader
    val_dataset: TokenDataset
    val_windows: WindowSet
    sink: NullSink
    meter: Meter
    health: Any  # pipeline.training.health.StepHealth, which imports this module
    step: int = 0
    tokens_seen: int = 0
    resumed_from: int | None = None
    val_loss: float | None = None
    last_checkpoint: Path | None = None
    stopping: bool = False
    # The optimizer settings as the optimizer holds them after the last checkpoint load
    # (pipeline/training/engine.py: apply_hyperparameters).
    applied_hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.config.train.seq_len

    def flush_meter(self) -> dict[str, float | None]:
        return self.meter.flush(tokens_seen=self.tokens_seen, skipped_steps=self.health.skipped_steps)

    def log(self, metrics: dict[str, float | None]) -> None:
        """Rank 0: to the sink (the run's journal) and one console line."""
        if self.rank != 0:
            return
        known = {name: value for name, value in metrics.items() if value is not None}
        self.sink.log_metrics(known, step=self.step)
        shown = " | ".join(f"{name.removeprefix('train/')} {value:.4g}" for name, value in known.items())
        print(f"step {self.step}/{self.config.train.max_steps} | {shown}", flush=True)


class Callback:
    """A periodic concern of the loop (pipeline/training/callbacks.py): it decides its own cadence."""

    def before_train(self, run: Run) -> None:
        """Once, after setup and resume, before the first step."""

    def after_step(self, run: Run, outcome: StepOutcome) -> None:
        """After every optimizer step (run.step already counts it)."""

    def close(self, run: Run) -> None:
        """Once, when training ends, also on an error."""
