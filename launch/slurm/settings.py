"""Where and how a run is submitted: `SlurmSettings`, from defaults, a site YAML and command-line flags."""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import SlurmError

SITE_ENV = "PRETRAIN_SITE"
DEFAULT_ENV = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


class SlurmSettings(BaseModel):
    """Where and how a run is submitted; every field can come from the site YAML."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(None, description="Partition (`--partition`); None: the cluster's default.")
    account: str | None = Field(None, description="Account charged (`--account`).")
    qos: str | None = Field(None, description="Quality of service (`--qos`).")
    time: str = Field(
        "04:00:00", description="Time limit of one job (`--time`, e.g. 1-00:00:00); a requeued job gets a fresh limit."
    )
    nodes: int = Field(1, ge=1, description="Nodes (`--nodes`); one Ray node each.")
    gpus_per_node: int = Field(
        0,
        ge=0,
        description="GPUs per node (`--gpus-per-node`), one training worker per "
        "GPU; 0 trains on CPUs with cpu_workers_per_node workers per node.",
    )
    cpu_workers_per_node: int = Field(1, ge=1, description="Training workers per node when gpus_per_node is 0.")
    cpus_per_task: int = Field(
        8,
        ge=1,
        description="CPUs per node (`--cpus-per-task`; one task per node runs "
        "its Ray node), split evenly among the node's training workers.",
    )
    mem: str | None = Field(None, description="Memory per node (`--mem`, e.g. 64G); None: the site default.")
    job_name: str | None = Field(None, description="Job name; default `pretrain-<run name>`.")
    modules: list[str] = Field(
        default_factory=list, description="Environment modules loaded first (`module load ...`)."
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before anything else, e.g. `source /shared/venvs/pretrain/bin/activate`.",
    )
    env: dict[str, str | None] = Field(
        default_factory=lambda: dict(DEFAULT_ENV),
        description="Environment "
        "variables for the pipeline and every Ray node (NCCL/OMP knobs), merged "
        "key by key over the defaults; null removes one. Values are "
        "double-quoted in the script, so $VARIABLES expand. OMP_NUM_THREADS "
        "defaults to the CPUs per training worker.",
    )
    python: str = Field(
        default_factory=lambda: sys.executable,
        description="Python of an environment with this "
        "project installed, as the compute nodes see it; the job runs `PYTHON -m launch.cli run` "
        "and the `ray` next to PYTHON.",
    )
    ray_port: int | None = Field(
        None,
        ge=1024,
        le=65000,
        description="First Ray head (GCS) port tried; Ray's "
        "minimal dashboard takes the next one, and ports in use are skipped two at a "
        "time. None: 20000 + 100 x (job id mod 120), so jobs sharing a node differ.",
    )
    ray_tmpdir: str = Field(
        "/tmp/ray-$SLURM_JOB_ID",
        description="Ray's temp dir on every node (logs, "
        "sockets); keep it short, unix socket paths are limited to 107 bytes.",
    )
    object_store_bytes: int | None = Field(
        None,
        ge=80_000_000,
        description="Ray object store per node in bytes; None: Ray's default (30% of the node's memory).",
    )
    ray_start_args: list[str] = Field(
        default_factory=list,
        description="Extra `ray start` arguments for every node, e.g. the worker port range a firewall allows.",
    )
    ray_start_timeout_s: int = Field(
        300,
        ge=10,
        description="Seconds the job waits for every node to join "
        "the Ray cluster before it fails, naming the nodes that did not.",
    )
    signal_seconds: int = Field(
        300,
        ge=0,
        description="Ask for the warning signal (USR1 to the batch script) "
        "this many seconds before the time limit (`--signal=B:USR1@N`); 0: none. "
        "Slurm delivers it up to a minute early or late.",
    )
    checkpoint_wait_s: int = Field(
        180,
        ge=1,
        description="After the warning, seconds to wait for the "
        "pipeline's checkpoint before requeueing anyway; below signal_seconds.",
    )
    requeue: bool = Field(
        True,
        description="On the warning signal, checkpoint and requeue the job "
        "(`--requeue`, `scontrol requeue`); false: checkpoint and end.",
    )
    max_requeues: int = Field(50, ge=0, description="Do not requeue a job that restarted this many times.")
    array_parallel: int | None = Field(
        None, ge=1, description="Sweeps: at most this many array tasks at once (`--array=0-N%K`)."
    )
    extra_sbatch: list[str] = Field(
        default_factory=list,
        description="More sbatch options, one per item, e.g. `--constraint=a100` or `--exclusive`.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SlurmSettings:
        per_node = self.workers_per_node
        if self.cpus_per_task < per_node:
            raise ValueError(
                f"cpus_per_task={self.cpus_per_task} gives less than one CPU to each of the "
                f"{per_node} training workers per node; raise cpus_per_task"
            )
        if self.signal_seconds and self.checkpoint_wait_s >= self.signal_seconds:
            raise ValueError(
                f"checkpoint_wait_s={self.checkpoint_wait_s} must be below signal_seconds="
                f"{self.signal_seconds}, or the time limit ends the job before it requeues"
            )
        return self

    @property
    def workers_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_workers_per_node

    @property
    def cpus_per_worker(self) -> int:
        return self.cpus_per_task // self.workers_per_node


# Command-line flags of `pretrain submit` that set a SlurmSettings field directly.
FLAG_FIELDS = {
    "nodes": int,
    "gpus_per_node": int,
    "cpus_per_task": int,
    "mem": str,
    "time": str,
    "partition": str,
    "account": str,
    "qos": str,
    "job_name": str,
    "signal_seconds": int,
    "array_parallel": int,
}


# ---------------------------------------------------------------------------------------------
# Settings: defaults < site YAML (or the settings saved with a run) < flags


def load_settings(
    site: str | None = None, flags: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> SlurmSettings:
    """Defaults, then `base` (saved settings) or the site YAML (`site`, else $PRETRAIN_SITE), then flags."""
    merged = {name: field.get_default(call_default_factory=True) for name, field in SlurmSettings.model_fields.items()}
    if base is not None:
        layer, source = base, "the run's saved Slurm settings"
    else:
        site = site or os.environ.get(SITE_ENV)
        layer, source = (_read_site(Path(site)), site) if site else ({}, "Slurm settings")
    for values in (layer, {key: value for key, value in (flags or {}).items() if value is not None}):
        merged = _merge(merged, values)
    merged["env"] = {key: value for key, value in merged["env"].items() if value is not None}
    try:
        return SlurmSettings.model_validate(merged)
    except ValidationError as exc:
        raise SlurmError(_settings_error(exc, source)) from None


def _merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """high over low; `env` merges key by key so a site adds a variable without repeating the defaults."""
    merged = dict(low)
    for key, value in high.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_maps else value
    return merged


def _read_site(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SlurmError(f"{path}: no such site file (from --site or ${SITE_ENV})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SlurmError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise SlurmError(
            f"{path}: the site file must be a mapping of Slurm settings ({', '.join(SlurmSettings.model_fields)})"
        )
    return raw


def _settings_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, list(SlurmSettings.model_fields), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"{source}: unknown Slurm setting `{key}`{hint}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: {key + ': ' if key else ''}{message}"
