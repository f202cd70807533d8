"""The train stage's driver: a Ray Train `TorchTrainer` worker group of cluster.num_workers ranks (gloo
on CPU, NCCL on GPU) on the running Ray, returning the `TrainResult` of rank 0.

The driver checks the shards once before any worker starts, so a bad shard is one line on the console
and no worker reads it. A user error raised on a rank keeps its traceback in `<run_dir>/logs/` and
reaches the driver as the same `UserError`, which the CLI prints as one line; Ray's own report of the
failed worker group goes to the Ray session logs. The result travels back through a small actor
(Ray Train returns only the metrics attached to checkpoints).
"""
from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.artifacts import atomic_write_text
from pipeline.config import Config
from pipeline.data import verify_shards
from pipeline.errors import UserError
from pipeline.rundir import LOGS_DIR, error_log
from pipeline.runtime import distributed_backend, ray_connection
from pipeline.training.requests import forward_signals
from pipeline.training.run import TrainResult

# Ray Train's controller logs a failed worker group with every worker's traceback at ERROR; for a user
# error the driver says it in one line, and the run's logs/ keep the tracebacks.
_RAY_TRAIN_LOGGERS = ("ray.train", "ray.train.v2")


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
        result = train_worker(run_dir, Path(loop_config["shard_dir"]), shards_verified=True)
    except UserError as exc:
        atomic_write_text(error_log(run_dir, f"train-rank{rank}"), traceback.format_exc())
        ray.get(outcome.set_error.remote(exc))
        raise
    if rank == 0:
        ray.get(outcome.set_result.remote(result.to_dict()))


def run_training(config: Config, shard_dir: Path, run_dir: Path) -> TrainResult:
    """Train in a Ray Train worker group attached to the running Ray (or cluster.address, or an embedded
    local Ray); resumes when run_dir holds a checkpoint. The run directory must hold the run's config."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.training.loop import check_storage

    run_dir, shard_dir, c = Path(run_dir).resolve(), Path(shard_dir).resolve(), config.cluster
    check_storage(config, run_dir)  # fail in a second, before starting the worker group
    verify_shards(shard_dir, config.data.verify_checksums)
    resources = {"CPU": c.cpus_per_worker} | ({"GPU": 1} if c.use_gpu else {})
    with ray_connection(config), forward_signals(run_dir), _ray_train_logs_to(run_dir):
        outcome = ray.remote(num_cpus=0)(_Outcome).remote()
        trainer = TorchTrainer(
            _worker, train_loop_config={"run_dir": str(run_dir), "shard_dir": str(shard_dir), "outcome": outcome},
            scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend=distributed_backend(c.use_gpu)),
            run_config=RunConfig(name="train", storage_path=str(run_dir / "ray"),
                                 failure_config=FailureConfig(max_failures=c.max_failures)))
        try:
            trainer.fit()
        except Exception:
            _, error = ray.get(outcome.get.remote())
            if error is not None:
                raise error from None
            raise
        result, _ = ray.get(outcome.get.remote())
    return TrainResult(**result)


@contextmanager
def _ray_train_logs_to(run_dir: Path) -> Iterator[None]:
    """Route Ray Train's driver-side loggers to `<run_dir>/logs/ray-train.log` while training runs."""
    path = Path(run_dir) / LOGS_DIR / "ray-train.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    saved = []
    for name in _RAY_TRAIN_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()
