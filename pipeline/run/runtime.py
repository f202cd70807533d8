"""The runtime layer: which accelerator and collective backend this process uses, and the Ray connection.

Everything that depends on the machine rather than the config is decided here, once: the stages, the
engine and the Slurm job ask this module. It imports no torch at module level: Ray workers import it
(through `quiet_ray_workers`) before Ray sets their thread count, and a torch imported that early keeps
more intra-op threads than torchrun gives a rank, so float sums would no longer match torchrun's.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pipeline.config import Config
from pipeline.errors import UserError

Task = TypeVar("Task")
Result = TypeVar("Result")
TASK_RETRIES = 3  # a task lost with its worker or node runs again elsewhere (tasks must be idempotent)


def has_cuda() -> bool:
    """Whether this process sees a CUDA device (imports torch on first use)."""
    import torch

    return torch.cuda.is_available()


def accelerator_name() -> str:
    """DeepSpeed's accelerator for this process: "cuda" with a GPU, else "cpu". An explicit
    DS_ACCELERATOR wins (a site may pin it)."""
    return os.environ.get("DS_ACCELERATOR") or ("cuda" if has_cuda() else "cpu")


def distributed_backend(use_gpu: bool) -> str:
    """The torch.distributed backend: NCCL for GPU workers, gloo for CPU processes."""
    return "nccl" if use_gpu else "gloo"


def worker_environment(use_gpu: bool) -> dict[str, str]:
    """Variables every Ray worker of a run gets: DeepSpeed's accelerator matching the workers' devices;
    Ray Train's print patch off (it tees each worker print to stdout and the root logger: every line
    twice); and its controller polling the worker group every 0.25 s instead of 2 s, which otherwise
    adds up to 2 s to noticing that the group started and again that it finished (bench/startup.py)."""
    return {
        "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    }


def ray_temp_root() -> Path:
    """A short temp root: Ray's unix socket paths must stay under 107 characters."""
    return Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "pretrain-ray"


@contextmanager
def ray_connection(config: Config, min_cpus: int = 0) -> Iterator[None]:
    """Use the Ray this process is connected to; else attach to `cluster.address`; else start an
    embedded Ray with enough CPUs for the training and data workers, and at least `min_cpus` (a sweep's
    concurrent trials), stopped again on exit."""
    import ray

    if ray.is_initialized():
        yield
        return
    c = config.cluster
    runtime_env = {
        "worker_process_setup_hook": "pipeline.run.runtime.quiet_ray_workers",
        "env_vars": worker_environment(c.use_gpu),
    }
    # Workers' output (library banners, DeepSpeed and torch warnings, Ray Train's controller) stays in
    # the Ray session logs; the driver tells the user what happens. Ray's own driver-side messages
    # below ERROR (the token-authentication banner of a local cluster) are not shown.
    quiet = {"log_to_driver": False, "configure_logging": True, "logging_level": logging.ERROR}
    if c.address:
        ray.init(address=c.address, runtime_env=runtime_env, **quiet)
    else:
        needed = int(math.ceil(max(c.num_workers * c.cpus_per_worker, config.data.num_workers, min_cpus)))
        ray.init(
            num_cpus=max(os.cpu_count() or 1, needed),
            include_dashboard=False,
            _temp_dir=str(ray_temp_root()),
            runtime_env=runtime_env,
            **quiet,
        )
    try:
        yield
    finally:
        ray.shutdown()


def quiet_ray_workers() -> None:
    """Runs in every Ray worker process (so: no torch import here, see the module docstring). Ray
    Train's placement-group cleaner asks the State API every second whether the controller lives;
    without the dashboard (the minimal `ray` install, and an embedded Ray here) every ask fails and
    warns, burying the training log. The cleaner only matters when the controller dies, and then Ray
    frees the placement group with the job anyway (workers' output, library warnings included, stays in
    their Ray session log files: `ray_connection` does not forward it)."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def run_tasks(
    config: Config,
    work: Callable[[Task], Result],
    tasks: Iterable[Task],
    *,
    reuse: Callable[[Task], Result | None] = lambda task: None,
    follow_up: Callable[[Task, Result], Task | None] = lambda task, result: None,
) -> Iterator[tuple[Task, Result, bool]]:
    """Run `work(task)` for every task, at most `data.num_workers` at once, each as a Ray task on any node
    (spread over the cluster), or one after another in this process when num_workers is 1 or there is
    a single task. Yields
    (task, result, reused) in completion order. `reuse(task)` may return a result already at hand,
    which skips the run; `follow_up(task, result)` may return one more task, queued first. A task's
    UserError is raised here as itself; the remaining tasks are cancelled."""
    queue = deque(tasks)
    if config.data.num_workers == 1 or len(queue) == 1:  # nothing to run side by side (a chain runs in turn)
        while queue:
            task = queue.popleft()
            result = reuse(task)
            reused = result is not None
            result = result if reused else work(task)
            yield task, result, reused
            _queue_next(queue, follow_up(task, result))
        return
    import ray

    with ray_connection(config):
        remote = _remote_function(work)
        running: dict = {}
        try:
            while queue or running:
                while queue and len(running) < config.data.num_workers:
                    task = queue.popleft()
                    result = reuse(task)
                    if result is None:
                        running[remote.remote(task)] = task
                        continue
                    yield task, result, True
                    _queue_next(queue, follow_up(task, result))
                if running:
                    [done], _ = ray.wait(list(running), num_returns=1)
                    task = running.pop(done)
                    result = remote_result(done)
                    yield task, result, False
                    _queue_next(queue, follow_up(task, result))
        finally:
            for ref in running:
                ray.cancel(ref, force=True)


@functools.lru_cache(maxsize=8)
def _remote_function(work: Callable):
    """The Ray remote version of `work`, registered with the cluster once per process."""
    import ray

    return ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")(work)


def _queue_next(queue: deque, task: object | None) -> None:
    if task is not None:
        queue.appendleft(task)


def remote_result(ref):
    """ray.get, with a task's UserError raised as itself rather than in Ray's wrapper (other errors keep
    the wrapper, whose text holds the remote traceback)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = remote_cause(exc)
        if isinstance(cause, UserError):
            raise cause from None
        raise


def remote_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, without Ray's wrapper (whose text repeats the remote traceback)."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def current_node() -> str:
    """The Ray node this process runs on (its node id), or "local" outside Ray."""
    import sys

    if "ray" not in sys.modules:
        return "local"
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
