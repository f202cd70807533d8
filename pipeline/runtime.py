"""The runtime layer: which accelerator and collective backend this process uses, and the Ray connection.

Everything that depends on the machine rather than the config is decided here, once: the stages, the
engine and the Slurm job ask this module. It imports no torch at module level: Ray workers import it
(through `quiet_ray_workers`) before Ray sets their thread count, and a torch imported that early keeps
more intra-op threads than torchrun gives a rank, so float sums would no longer match torchrun's.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import Config


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
    """Variables every Ray worker of a run gets: DeepSpeed's accelerator matching the workers' devices,
    and Ray Train's print patch off (it tees each worker print to stdout and the root logger: every
    line twice)."""
    return {
        "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }


def ray_temp_root() -> Path:
    """A short temp root: Ray's unix socket paths must stay under 107 characters."""
    return Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "pretrain-ray"


@contextmanager
def ray_connection(config: Config) -> Iterator[None]:
    """Use the Ray this process is connected to; else attach to `cluster.address`; else start an
    embedded Ray with enough CPUs for the training and data workers (stopped again on exit)."""
    import ray

    if ray.is_initialized():
        yield
        return
    c = config.cluster
    runtime_env = {
        "worker_process_setup_hook": "pipeline.runtime.quiet_ray_workers",
        "env_vars": worker_environment(c.use_gpu),
    }
    # Workers' output (library banners, DeepSpeed and torch warnings, Ray Train's controller) stays in
    # the Ray session logs; the driver tells the user what happens. Ray's own driver-side messages
    # below ERROR (the token-authentication banner of a local cluster) are not shown.
    quiet = {"log_to_driver": False, "configure_logging": True, "logging_level": logging.ERROR}
    if c.address:
        ray.init(address=c.address, runtime_env=runtime_env, **quiet)
    else:
        needed = int(math.ceil(max(c.num_workers * c.cpus_per_worker, config.data.num_workers)))
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
