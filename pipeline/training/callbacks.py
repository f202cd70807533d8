"""The periodic concerns of the training loop, each owning its cadence (as torchtitan's components or
OLMo-core's callbacks): the loop calls `after_step` of each, in order, after every optimizer step.

Order matters and is fixed by `default_callbacks`: the rollback (pipeline/training/health.py) comes
first, so the others see `outcome.rolled_back` and skip the step; metrics are logged before a
validation, which comes before the checkpoint that may follow it. Every rank runs every callback
(their collectives must match); only rank 0 writes metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.run.rundir import PROFILE_DIR
from pipeline.tracking.names import METRIC_VAL_LOSS
from pipeline.training.async_checkpoint import PendingCheckpoint, SnapshotWriter, seal_and_prune
from pipeline.training.checkpoint import latest_pointer, save_checkpoint
from pipeline.training.health import StepHealth
from pipeline.training.requests import CHECKPOINT_AND_STOP, NO_REQUEST, CheckpointRequests
from pipeline.training.run import Callback, Run, StepOutcome


class MetricsLogger(Callback):
    """Training metrics every train.log_every steps, and the last, shorter window at the end."""

    def __init__(self, every: int):
        self.every, self.logged_at = every, None

    def after_step(self, run: Run, outcome: StepOutcome) -> None:
        if not outcome.rolled_back and run.step % self.every == 0:
            run.log(run.flush_meter())
            self.logged_at = run.step

    def close(self, run: Run) -> None:
        finished = run.step >= run.config.train.max_steps or run.stopping  # not on an error: no collective then
        if finished and run.meter.window_steps and self.logged_at != run.step:
            run.log(run.flush_meter())


class Validator(Callback):
    """Validation loss every train.eval_every steps and at the last step; 0 disables it."""

    def __init__(self, every: int, evaluate: Callable[[Run], dict[str, float]]):
        self.every, self.evaluate = every, evaluate

    def after_step(self, run: Run, outcome: StepOutcome) -> None:
        if outcome.rolled_back or not self.every:
            return
        if run.step % self.every == 0 or run.step == run.config.train.max_steps:
            losses = self.evaluate(run)
            run.val_loss = losses[METRIC_VAL_LOSS]
            run.log(losses)


class Checkpointer(Callback):
    """A checkpoint every train.checkpoint_every steps, at the last step, and on request (SIGUSR1; SIGTERM
    and Ctrl-C also stop training after it). Ranks agree on requests with one small all-reduce, read on
    the host, only every `check_every` steps (train.log_every, where the metrics sync anyway) and at
    checkpoint steps: a host sync per step would stall a GPU's queue of kernels.

    With train.async_checkpoint, periodic checkpoints are written in the background
    (pipeline/training/async_checkpoint.py) and sealed at a later check once every rank's files are
    durable; the last one and one on a stop are written synchronously, after any still in flight."""

    def __init__(self, every: int, requests: CheckpointRequests, check_every: int, asynchronous: bool):
        self.every, self.requests, self.check_every, self.asynchronous = every, requests, check_every, asynchronous
        self.writer: SnapshotWriter | None = None
        self.pending: PendingCheckpoint | None = None

    def before_train(self, run: Run) -> None:
        if self.asynchronous:
            self.writer = SnapshotWriter(run.engine.checkpoint_engine)
            run.engine.checkpoint_engine = self.writer
            keep = run.config.train.keep_checkpoints
            self.pending = PendingCheckpoint(
                self.writer, run.rank, lambda path, digests: seal_and_prune(path, digests, keep)
            )

    def after_step(self, run: Run, outcome: StepOutcome) -> None:
        scheduled = run.step == run.config.train.max_steps or (self.every and run.step % self.every == 0)
        due = scheduled or run.step % self.check_every == 0
        request = self.requests.agreed(run.device) if due else NO_REQUEST
        run.stopping = run.stopping or request == CHECKPOINT_AND_STOP
        if outcome.rolled_back:  # the checkpoint just loaded is the one to stop at
            if self.pending is not None:
                self.pending.discard()
            return
        if due and self.pending is not None:
            run.last_checkpoint = self.pending.poll(run.device) or run.last_checkpoint
        if request or scheduled:
            self._save(run, final=run.stopping or run.step >= run.config.train.max_steps)

    def _save(self, run: Run, final: bool) -> None:
        if self.pending is None:
            run.last_checkpoint = save_checkpoint(run)
            return
        run.last_checkpoint = self.pending.finish() or run.last_checkpoint
        if final:
            with self.writer.synchronous():
                run.last_checkpoint = save_checkpoint(run)
            return
        latest = latest_pointer(run.run_dir)
        self.pending.started(save_checkpoint(run, asynchronous=True), latest)

    def close(self, run: Run) -> None:
        self.requests.close()


class Profiler(Callback):
    """A torch profiler trace of train.profile_steps steps from train.profile_at_step, one Chrome trace
    per rank in `<run_dir>/profile/` plus rank 0's table of the costliest operators. The forward,
    backward and optimizer phases are labelled (pipeline/training/loop.py), so the step-time split
    reads straight off the trace."""

    def __init__(self, start_step: int, steps: int, run_dir: Path):
        self.start_step, self.steps, self.out = start_step, steps, Path(run_dir) / PROFILE_DIR
        self.profiler: torch.profiler.profile | None = None

    def before_train(self, run: Run) -> None:
        self._maybe_start(run)

    def after_step(self, run: Run, outcome: StepOutcome) -> None:
        if self.profiler is not None and run.step >= self.start_step + self.steps - 1:
            self._stop(run)
        self._maybe_start(run)

    def close(self, run: Run) -> None:
        if self.profiler is not None:
            self._stop(run)

    def _maybe_start(self, run: Run) -> None:
        if self.profiler is None and run.step + 1 == self.start_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if run.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()

    def _stop(self, run: Run) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.out / f"trace-rank{run.rank:05d}-step{self.start_step}.json"))
        if run.rank == 0:
            sort_by = "cuda_time_total" if run.device.type == "cuda" else "cpu_time_total"
            table = profiler.key_averages().table(sort_by=sort_by, row_limit=25)
            (self.out / f"top-ops-step{self.start_step}.txt").write_text(table + "\n", encoding="utf-8")
            print(f"profile: {self.steps} steps from step {self.start_step} written to {self.out}", flush=True)


def default_callbacks(
    config: Config, run_dir: Path, rank: int, health: StepHealth, evaluate: Callable[[Run], dict[str, float]]
) -> list[Callback]:
    t = config.train
    callbacks: list[Callback] = [
        health,
        MetricsLogger(t.log_every),
        Validator(t.eval_every, evaluate),
        Checkpointer(
            t.checkpoint_every,
            CheckpointRequests(run_dir, rank),
            check_every=t.log_every,
            asynchronous=t.async_checkpoint,
        ),
    ]
    if t.profile_at_step is not None:
        callbacks.append(Profiler(t.profile_at_step, t.profile_steps, run_dir))
    return callbacks
