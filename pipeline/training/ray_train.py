"""The train stage's driver: a Ray Train `TorchTrainer` worker group of cluster.num_workers ranks (gloo
on CPU, NCCL on GPU) on the running Ray, returning the `TrainResult` of rank 0.

The driver checks the shards once before any worker starts, so a bad shard is one line on the console
and no worker reads it. A user error raised on a rank keeps its traceback in `<run_dir>/logs/` and
reaches the driver as the same `UserError`, which the CLI prints as one line; Ray's own report of the
failed worker group goes to the Ray session logs. The result travels back through a small actor
(Ray Train returns only the metrics attached to checkpoints). Workers' output stays in the Ray
session logs; the driver shows the progress from the run's journal (pipeline/training/progress.py).
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data.shards import verify_shards
from pipeline.errors import UserError
from pipeline.run.rundir import save_traceback
from pipeline.run.runtime import distributed_backend, ray_connection
from pipeline.training.checkpoint import nothing_left_message, resume_point
from pipeline.training.loop import check_storage
from pipeline.training.progress import training_progress
from pipeline.training.requests import forward_signals
from pipeline.training.run import TrainResult


class _Outcome:
    """Rank 0's result, or the first user error of any rank (a Ray actor while training runs)."""

    def __init__(self) -> None:
        self.result: dict[str, Any] | None = None
        self.error: UserError | None = None

    def set_result(self, result: dict[str, Any]) -> None:
        self.result = result

    def set_error(self, error: UserError) -> None:
        self.error = self.error or error

    def get(self) -> tuple[dict[str, Any] | None, UserError | None]:
        return self.result, self.error


def _worker(loop_config: dict[str, Any]) -> None:
    """One rank under Ray Train (torch.distributed is already set up by Ray)."""
    import ray
    import ray.train

    from pipeline.training.loop import train_worker

    run_dir, outcome = Path(loop_config["run_dir"]), loop_config["outcome"]
    rank = ray.train.get_context().get_world_rank()
    try:
        result = train_worker(run_dir, Path(loop_config["shard_dir"]), driver_verified=True)
    except UserError as exc:
        save_traceback(run_dir, f"train-rank{rank}", traceback.format_exc())
        ray.get(outcome.set_error.remote(exc))
        raise
    if rank == 0:
        ray.get(outcome.set_result.remote(result.to_dict()))


def run_training(config: Config, shard_dir: Path, run_dir: Path, echo: Callable[[str], None] = print) -> TrainResult:
    """Train in a Ray Train worker group attached to the running Ray (or cluster.address, or an embedded
    local Ray); resumes when run_dir holds a checkpoint. The run directory must hold the run's config.
    Everything a user can get wrong is checked here, before a worker starts."""
    run_dir, shard_dir = Path(run_dir).resolve(), Path(shard_dir).resolve()
    check_storage(config, run_dir)
    verify_shards(shard_dir, config.data.verify_checksums)
    announce_resume(resume_point(run_dir, config), config.train.max_steps, echo)
    with (
        ray_connection(config),
        forward_signals(run_dir, echo) as forwarded,
        training_progress(run_dir, config.train.max_steps, echo),
    ):
        result = _fit(config, shard_dir, run_dir)
    result.interrupted = forwarded.interrupted
    return result


def announce_resume(point: tuple[Path, dict, dict] | None, max_steps: int, echo: Callable[[str], None]) -> None:
    """The checkpoint a run resumes from and the config changes it allows (refused ones raised already)."""
    if point is None:
        return
    path, state, changes = point
    echo(f"resumed from {path} (step {state['step']}, {state['tokens_seen']:,} tokens)")
    for key, (old, new) in changes.items():
        echo(f"resume: {key} changed from {old!r} to {new!r}")
    if state["step"] >= max_steps:
        echo(nothing_left_message(state["step"], max_steps))


def _fit_in_a_thread(trainer) -> None:
    """Ray Train's fit() takes SIGINT over when it runs in the main thread (it aborts the run without a
    checkpoint); in a thread it does not, so Ctrl-C reaches `forward_signals`: a checkpoint, then a stop."""
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits: the main thread runs signal handlers between them
    if "error" in outcome:
        raise outcome["error"]


def _fit(config: Config, shard_dir: Path, run_dir: Path) -> TrainResult:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = config.cluster
    outcome = ray.remote(num_cpus=0)(_Outcome).remote()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"run_dir": str(run_dir), "shard_dir": str(shard_dir), "outcome": outcome},
        scaling_config=ScalingConfig(
            num_workers=c.num_workers,
            use_gpu=c.use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker} | ({"GPU": 1} if c.use_gpu else {}),
        ),
        torch_config=TorchConfig(backend=distributed_backend(c.use_gpu)),
        run_config=RunConfig(
            name="train", storage_path=str(run_dir / "ray"), failure_config=FailureConfig(max_failures=c.max_failures)
        ),
    )
    try:
        _fit_in_a_thread(trainer)
    except Exception:
        _, error = ray.get(outcome.get.remote())
        if error is not None:
            raise error from None
        raise
    result, _ = ray.get(outcome.get.remote())
    return TrainResult(**result)
