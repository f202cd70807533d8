"""The runs of a submission (one per sweep combination) and the job script rendered for them."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from launch.slurm.settings import SlurmSettings
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, SlurmError
from pipeline.run.rundir import run_dir_of
from pipeline.sweep.space import Trial, parse_axes, sweep_trials

TEMPLATE = "pretrain.sbatch"  # the top-level slurm/ folder, shipped in the wheel as package data


def template_text() -> str:
    return resources.files("slurm").joinpath(TEMPLATE).read_text(encoding="utf-8")


@dataclass(frozen=True)
class RunTask:
    """One run of a submission (one array task of a sweep)."""

    name: str
    run_dir: Path
    config: Config
    combination: tuple[str, ...] = ()
    sweep_name: str = ""  # the config's run name, which a sweep's combinations extend


def cluster_overrides(settings: SlurmSettings) -> list[str]:
    """The `cluster` section of a run inside the allocation: attach to its Ray, one worker per GPU (or
    cpu_workers_per_node), each with its share of the node's CPUs."""
    return [
        "cluster.address=auto",
        f"cluster.num_workers={settings.nodes * settings.workers_per_node}",
        f"cluster.use_gpu={'true' if settings.gpus_per_node else 'false'}",
        f"cluster.cpus_per_worker={settings.cpus_per_worker}",
    ]


def prepare_runs(config_path: str, overrides: list[str], sweeps: list[str], settings: SlurmSettings) -> list[RunTask]:
    """Validate the config once per sweep combination, with the allocation's cluster settings and an
    absolute workdir (the job's working directory may differ); a bad combination fails the submission."""
    base = load_config(config_path, overrides)
    workdir = Path(base.run.workdir).resolve()
    fixed = [f"run.workdir={json.dumps(str(workdir))}", *cluster_overrides(settings)]
    tasks = []
    trials = sweep_trials(base.run.name, parse_axes(sweeps)) if sweeps else [Trial(base.run.name, ())]
    for name, combination in ((trial.name, list(trial.overrides)) for trial in trials):
        try:
            config = load_config(config_path, [*overrides, *combination, f"run.name={json.dumps(name)}", *fixed])
        except ConfigError as exc:
            raise SlurmError(f"{' '.join(combination) or 'config'} as submitted: {exc}") from None
        tasks.append(RunTask(name, run_dir_of(config), config, tuple(combination), base.run.name))
    return tasks


# The job script

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render_template(template: str, values: dict[str, Any]) -> str:
    """Fill `{{name}}` placeholders. A line whose placeholders are all None or "" is dropped when it is an
    `#SBATCH` option (the site does not use it) or holds nothing else (an empty block)."""
    names = set(_PLACEHOLDER.findall(template))
    if names != values.keys():
        raise SlurmError(
            f"template {TEMPLATE}: placeholders without a value {sorted(names - values.keys())}, "
            f"values without a placeholder {sorted(values.keys() - names)}"
        )
    lines = []
    for line in template.splitlines():
        found = _PLACEHOLDER.findall(line)
        empty = bool(found) and all(values[name] in (None, "") for name in found)
        if empty and (line.startswith("#SBATCH") or not _PLACEHOLDER.sub("", line).strip()):
            continue
        lines.append(_PLACEHOLDER.sub(lambda match: _text(values[match.group(1)]), line))
    return "\n".join(lines) + "\n"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def double_quoted(value: str) -> str:
    """A bash double-quoted word: $VARIABLES expand, quotes and backticks stay literal."""
    return '"' + re.sub(r'(["\\`])', r"\\\1", value) + '"'


def job_environment(settings: SlurmSettings) -> dict[str, str]:
    """What the script exports: computed knobs, then the settings' env over them."""
    computed = {"OMP_NUM_THREADS": str(settings.cpus_per_worker), "PYTHONUNBUFFERED": "1"}
    return {**computed, **{key: value for key, value in settings.env.items() if value is not None}}


def script_values(
    settings: SlurmSettings, tasks: list[RunTask], *, output: Path, array: str | None, job_name: str, chdir: Path
) -> dict[str, Any]:
    s = settings
    return {
        "job_name": job_name,
        "nodes": s.nodes,
        "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node or None,
        "mem": s.mem,
        "time": s.time,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "array": array,
        "output": output,
        "chdir": chdir,
        "requeue": "--requeue" if s.requeue else "--no-requeue",
        "requeue_enabled": int(s.requeue),
        "signal_seconds": s.signal_seconds or None,
        "checkpoint_wait_s": s.checkpoint_wait_s,
        "max_requeues": s.max_requeues,
        "extra_sbatch": "\n".join(f"#SBATCH {option}" for option in s.extra_sbatch),
        "modules": f"module load {' '.join(shlex.quote(m) for m in s.modules)}" if s.modules else "",
        "setup": "\n".join(s.setup),
        "env": "\n".join(f"export {key}={double_quoted(value)}" for key, value in job_environment(s).items()),
        "python": shlex.quote(s.python),
        "run_dirs": " ".join(shlex.quote(str(t.run_dir)) for t in tasks),
        "ray_port": s.ray_port or "$((20000 + 100 * (SLURM_JOB_ID % 120)))",
        "ray_tmpdir": double_quoted(s.ray_tmpdir),
        "ray_start_timeout_s": s.ray_start_timeout_s,
        "ray_start_args": " ".join(shlex.quote(arg) for arg in _ray_node_args(s)),
    }


def _ray_node_args(settings: SlurmSettings) -> list[str]:
    sized = [f"--object-store-memory={settings.object_store_bytes}"] if settings.object_store_bytes else []
    return [*sized, *settings.ray_start_args]


def render_script(
    settings: SlurmSettings, tasks: list[RunTask], *, output: Path, array: str | None, chdir: Path
) -> str:
    job_name = settings.job_name or f"pretrain-{tasks[0].name if array is None else sweep_base(tasks)}"
    values = script_values(settings, tasks, output=output, array=array, job_name=job_name, chdir=chdir)
    return render_template(template_text(), values)


def sweep_base(tasks: list[RunTask]) -> str:
    return tasks[0].sweep_name or tasks[0].name
