"""Slurm: `pretrain submit` and `pretrain status`, the sbatch template renderer, sweeps and requeue.

`pretrain submit CONFIG [overrides] --nodes N ...` validates the config as the job will run it (attached
to a Ray cluster inside the allocation: cluster.address=auto, workers = nodes x GPUs per node, or CPU
workers per node), writes that resolved config and the rendered `slurm/pretrain.sbatch` into the run
directory and calls sbatch. The job starts Ray on its nodes with srun and runs `pretrain run`; on the
warning signal it asks the pipeline for a checkpoint and requeues itself, and the requeued job resumes the
same run directory (same MLflow run, exact data position).

Settings (`SlurmSettings`), lowest first: the defaults below, a site YAML (`--site FILE` or
$PRETRAIN_SITE), then command-line flags; `--resume RUN_DIR` starts from the settings saved with the run.

Files:
    <run_dir>/slurm/config.yaml       the resolved config the job runs
    <run_dir>/slurm/settings.yaml     the Slurm settings it was submitted with
    <run_dir>/slurm/job.sbatch        the rendered script (single runs)
    <run_dir>/slurm/jobs.json         every job submitted for the run: id, array task, script, log
    <run_dir>/slurm/<jobid>.out       the job's output (sweeps log to <sweep_dir>/<jobid>_<task>.out)
    <run_dir>/slurm/ray-<jobid>.json  the job's Ray nodes and where the training workers ran
    <workdir>/sweeps/<name>-<time>/   a sweep's array script and tasks.json

The rendered script calls two helpers of this module inside the job: `python -m launch.slurm wait-ray`
and `python -m launch.slurm ray-summary`.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.artifacts import atomic_write_json, atomic_write_text
from pipeline.config import Config, ConfigError, dump_config, load_config
from pipeline.orchestrate import RunState, run_dir_of

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "pretrain.sbatch"
SITE_ENV = "PRETRAIN_SITE"
SLURM_DIR = "slurm"
JOBS_FILE = "jobs.json"
# Job states in which a run already has a job that will (re)start or is running.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
DEFAULT_ENV = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


class SlurmError(ConfigError):
    """A submit/status problem in one line (a ConfigError, so `pretrain` prints it without a traceback)."""


class SlurmSettings(BaseModel):
    """Where and how a run is submitted; every field can come from the site YAML."""
    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(None, description="Partition (`--partition`); None: the cluster's default.")
    account: str | None = Field(None, description="Account charged (`--account`).")
    qos: str | None = Field(None, description="Quality of service (`--qos`).")
    time: str = Field("04:00:00", description="Time limit of one job (`--time`, e.g. 1-00:00:00); a requeued "
                      "job gets a fresh limit.")
    nodes: int = Field(1, ge=1, description="Nodes (`--nodes`); one Ray node each.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (`--gpus-per-node`), one training worker per "
                               "GPU; 0 trains on CPUs with cpu_workers_per_node workers per node.")
    cpu_workers_per_node: int = Field(1, ge=1, description="Training workers per node when gpus_per_node is 0.")
    cpus_per_task: int = Field(8, ge=1, description="CPUs per node (`--cpus-per-task`; one task per node runs "
                               "its Ray node), split evenly among the node's training workers.")
    mem: str | None = Field(None, description="Memory per node (`--mem`, e.g. 64G); None: the site default.")
    job_name: str | None = Field(None, description="Job name; default `pretrain-<run name>`.")
    modules: list[str] = Field(default_factory=list, description="Environment modules loaded first "
                               "(`module load ...`).")
    setup: list[str] = Field(default_factory=list, description="Shell lines run before anything else, e.g. "
                             "`source /shared/venvs/pretrain/bin/activate`.")
    env: dict[str, str | None] = Field(default_factory=lambda: dict(DEFAULT_ENV), description="Environment "
                                       "variables for the pipeline and every Ray node (NCCL/OMP knobs), merged "
                                       "key by key over the defaults; null removes one. Values are "
                                       "double-quoted in the script, so $VARIABLES expand. OMP_NUM_THREADS "
                                       "defaults to the CPUs per training worker.")
    python: str = Field(default_factory=lambda: sys.executable, description="Python of an environment with this "
                        "project installed, as the compute nodes see it; the job runs `PYTHON -m launch.cli run` "
                        "and the `ray` next to PYTHON.")
    ray_port: int | None = Field(None, ge=1024, le=65000, description="First Ray head (GCS) port tried; Ray's "
                                 "minimal dashboard takes the next one, and ports in use are skipped two at a "
                                 "time. None: 20000 + 100 x (job id mod 120), so jobs sharing a node differ.")
    ray_tmpdir: str = Field("/tmp/ray-$SLURM_JOB_ID", description="Ray's temp dir on every node (logs, "
                            "sockets); keep it short, unix socket paths are limited to 107 bytes.")
    object_store_bytes: int | None = Field(None, ge=80_000_000, description="Ray object store per node in bytes; "
                                           "None: Ray's default (30% of the node's memory).")
    ray_start_args: list[str] = Field(default_factory=list, description="Extra `ray start` arguments for every "
                                      "node, e.g. the worker port range a firewall allows.")
    ray_start_timeout_s: int = Field(300, ge=10, description="Seconds the job waits for every node to join "
                                     "the Ray cluster before it fails, naming the nodes that did not.")
    signal_seconds: int = Field(300, ge=0, description="Ask for the warning signal (USR1 to the batch script) "
                                "this many seconds before the time limit (`--signal=B:USR1@N`); 0: none. "
                                "Slurm delivers it up to a minute early or late.")
    checkpoint_wait_s: int = Field(180, ge=1, description="After the warning, seconds to wait for the "
                                   "pipeline's checkpoint before requeueing anyway; below signal_seconds.")
    requeue: bool = Field(True, description="On the warning signal, checkpoint and requeue the job "
                          "(`--requeue`, `scontrol requeue`); false: checkpoint and end.")
    max_requeues: int = Field(50, ge=0, description="Do not requeue a job that restarted this many times.")
    array_parallel: int | None = Field(None, ge=1, description="Sweeps: at most this many array tasks at "
                                       "once (`--array=0-N%K`).")
    extra_sbatch: list[str] = Field(default_factory=list, description="More sbatch options, one per item, e.g. "
                                    "`--constraint=a100` or `--exclusive`.")

    @model_validator(mode="after")
    def _consistent(self) -> SlurmSettings:
        per_node = self.workers_per_node
        if self.cpus_per_task < per_node:
            raise ValueError(f"cpus_per_task={self.cpus_per_task} gives less than one CPU to each of the "
                             f"{per_node} training workers per node; raise cpus_per_task")
        if self.signal_seconds and self.checkpoint_wait_s >= self.signal_seconds:
            raise ValueError(f"checkpoint_wait_s={self.checkpoint_wait_s} must be below signal_seconds="
                             f"{self.signal_seconds}, or the time limit ends the job before it requeues")
        return self

    @property
    def workers_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_workers_per_node

    @property
    def cpus_per_worker(self) -> int:
        return self.cpus_per_task // self.workers_per_node


# Command-line flags of `pretrain submit` that set a SlurmSettings field directly.
FLAG_FIELDS = {"nodes": int, "gpus_per_node": int, "cpus_per_task": int, "mem": str, "time": str,
               "partition": str, "account": str, "qos": str, "job_name": str, "signal_seconds": int}


# ---------------------------------------------------------------------------------------------
# Settings: defaults < site YAML (or the settings saved with a run) < flags


def load_settings(site: str | None = None, flags: dict[str, Any] | None = None,
                  base: dict[str, Any] | None = None) -> SlurmSettings:
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
        raise SlurmError(f"{path}: the site file must be a mapping of Slurm settings "
                         f"({', '.join(SlurmSettings.model_fields)})")
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


# ---------------------------------------------------------------------------------------------
# Sweeps


def split_values(text: str) -> list[str]:
    """`1e-3,3e-4` -> ["1e-3", "3e-4"]; commas inside [] or {} belong to a YAML value."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """`train.lr=1e-3,3e-4` -> ("train.lr", ["1e-3", "3e-4"])."""
    key, sep, values_text = text.partition("=")
    values = split_values(values_text) if sep else []
    if not key.strip() or "." not in key or not values or "" in values:
        raise SlurmError(f"--sweep {text!r} must look like section.key=value1,value2 (e.g. train.lr=1e-3,3e-4)")
    if len(set(values)) != len(values):
        raise SlurmError(f"--sweep {text!r} repeats a value")
    return key.strip(), values


def sweep_combinations(sweeps: list[str]) -> list[list[str]]:
    """The cartesian product of the sweeps as override lists, first sweep varying slowest."""
    parsed = [parse_sweep(text) for text in sweeps]
    keys = [key for key, _ in parsed]
    if len(set(keys)) != len(keys):
        raise SlurmError(f"--sweep names a key twice: {', '.join(keys)}")
    return [[f"{key}={value}" for key, value in zip(keys, combo)]
            for combo in itertools.product(*(values for _, values in parsed))]


def combination_name(base: str, combination: list[str]) -> str:
    """`gpt-tiny` + [train.lr=1e-3, model.n_layers=2] -> `gpt-tiny-lr=1e-3-n_layers=2` (safe as a dir name)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in (item.split("=", 1) for item in combination)]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join([base, *parts]))


# ---------------------------------------------------------------------------------------------
# Runs of a submission: validated configs as the job runs them


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
    return ["cluster.address=auto",
            f"cluster.num_workers={settings.nodes * settings.workers_per_node}",
            f"cluster.use_gpu={'true' if settings.gpus_per_node else 'false'}",
            f"cluster.cpus_per_worker={settings.cpus_per_worker}"]


def prepare_runs(config_path: str, overrides: list[str], sweeps: list[str],
                 settings: SlurmSettings) -> list[RunTask]:
    """Validate the config once per sweep combination, with the allocation's cluster settings and an
    absolute workdir (the job's working directory may differ); a bad combination fails the submission."""
    base = load_config(config_path, overrides)
    workdir = Path(base.run.workdir).resolve()
    fixed = [f"run.workdir={json.dumps(str(workdir))}", *cluster_overrides(settings)]
    tasks = []
    for combination in sweep_combinations(sweeps) if sweeps else [[]]:
        name = combination_name(base.run.name, combination) if sweeps else base.run.name
        try:
            config = load_config(config_path, [*overrides, *combination, f"run.name={json.dumps(name)}", *fixed])
        except ConfigError as exc:
            raise SlurmError(f"{' '.join(combination) or 'config'} as submitted: {exc}") from None
        tasks.append(RunTask(name, run_dir_of(config), config, tuple(combination), base.run.name))
    if len({task.name for task in tasks}) != len(tasks):
        raise SlurmError("two sweep combinations give the same run name (run names use the last part of each "
                         "key): sweep keys whose last parts differ")
    return tasks


# ---------------------------------------------------------------------------------------------
# Rendering slurm/pretrain.sbatch

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render_template(template: str, values: dict[str, Any]) -> str:
    """Fill `{{name}}` placeholders. A line whose placeholders are all None or "" is dropped when it is an
    `#SBATCH` option (the site does not use it) or holds nothing else (an empty block)."""
    names = set(_PLACEHOLDER.findall(template))
    if names != values.keys():
        raise SlurmError(f"template {TEMPLATE}: placeholders without a value {sorted(names - values.keys())}, "
                         f"values without a placeholder {sorted(values.keys() - names)}")
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
    computed = {"OMP_NUM_THREADS": str(settings.cpus_per_worker), "PYTHONUNBUFFERED": "1",
                "DS_ACCELERATOR": "cuda" if settings.gpus_per_node else "cpu"}
    return {**computed, **{key: value for key, value in settings.env.items() if value is not None}}


def script_values(settings: SlurmSettings, tasks: list[RunTask], *, output: Path, array: str | None,
                  job_name: str, chdir: Path) -> dict[str, Any]:
    s = settings
    return {
        "job_name": job_name, "nodes": s.nodes, "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node or None, "mem": s.mem, "time": s.time, "partition": s.partition,
        "account": s.account, "qos": s.qos, "array": array, "output": output, "chdir": chdir,
        "requeue": "--requeue" if s.requeue else "--no-requeue", "requeue_enabled": int(s.requeue),
        "signal_seconds": s.signal_seconds or None, "checkpoint_wait_s": s.checkpoint_wait_s,
        "max_requeues": s.max_requeues, "extra_sbatch": "\n".join(f"#SBATCH {option}" for option in s.extra_sbatch),
        "modules": f"module load {' '.join(shlex.quote(m) for m in s.modules)}" if s.modules else "",
        "setup": "\n".join(s.setup),
        "env": "\n".join(f"export {key}={double_quoted(value)}" for key, value in job_environment(s).items()),
        "python": shlex.quote(s.python), "run_dirs": " ".join(shlex.quote(str(t.run_dir)) for t in tasks),
        "ray_port": s.ray_port or "$((20000 + 100 * (SLURM_JOB_ID % 120)))",
        "ray_tmpdir": double_quoted(s.ray_tmpdir), "ray_start_timeout_s": s.ray_start_timeout_s,
        "ray_start_args": " ".join(shlex.quote(arg) for arg in _ray_node_args(s)),
    }


def _ray_node_args(settings: SlurmSettings) -> list[str]:
    sized = [f"--object-store-memory={settings.object_store_bytes}"] if settings.object_store_bytes else []
    return [*sized, *settings.ray_start_args]


def render_script(settings: SlurmSettings, tasks: list[RunTask], *, output: Path, array: str | None,
                  chdir: Path) -> str:
    job_name = settings.job_name or f"pretrain-{tasks[0].name if array is None else _sweep_base(tasks)}"
    values = script_values(settings, tasks, output=output, array=array, job_name=job_name, chdir=chdir)
    return render_template(TEMPLATE.read_text(encoding="utf-8"), values)


def _sweep_base(tasks: list[RunTask]) -> str:
    return tasks[0].sweep_name or tasks[0].name


# ---------------------------------------------------------------------------------------------
# Submitting


@dataclass(frozen=True)
class Submission:
    """What one `sbatch` call submits: the runs, where the script and logs go, the array spec."""
    tasks: list[RunTask]
    script_path: Path
    output: Path
    array: str | None


def plan_submission(tasks: list[RunTask], settings: SlurmSettings, *, sweep: bool) -> Submission:
    if not sweep:
        slurm_dir = tasks[0].run_dir / SLURM_DIR
        return Submission(tasks, slurm_dir / "job.sbatch", slurm_dir / "%j.out", None)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(tasks[0].config.run.workdir) / "sweeps" / f"{_sweep_base(tasks)}-{stamp}"
    limit = f"%{settings.array_parallel}" if settings.array_parallel else ""
    return Submission(tasks, sweep_dir / "job.sbatch", sweep_dir / "%A_%a.out", f"0-{len(tasks) - 1}{limit}")


def submit(submission: Submission, settings: SlurmSettings, script: str) -> str:
    """Write the configs, settings and script (atomically), call sbatch, record the job in each run."""
    for task in submission.tasks:
        refuse_if_active(task.run_dir)
    for task in submission.tasks:
        slurm_dir = task.run_dir / SLURM_DIR
        atomic_write_text(slurm_dir / "config.yaml", dump_config(task.config))
        atomic_write_text(slurm_dir / "settings.yaml", yaml.safe_dump(settings.model_dump(), sort_keys=False))
    atomic_write_text(submission.script_path, script)
    if submission.array is not None:
        atomic_write_json(submission.script_path.parent / "tasks.json",
                          [{"run": t.name, "run_dir": t.run_dir, "overrides": list(t.combination)}
                           for t in submission.tasks])
    job_id = sbatch(submission.script_path)
    for index, task in enumerate(submission.tasks):
        record_job(task.run_dir, job_id, index if submission.array is not None else None, submission)
    return job_id


def sbatch(script_path: Path) -> str:
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: submit from a Slurm login node, or print the script with --dry-run")
    done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SlurmError(f"sbatch {script_path} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]  # --parsable prints `id` or `id;cluster`


def record_job(run_dir: Path, job_id: str, array_task: int | None, submission: Submission) -> None:
    slurm_id = job_id if array_task is None else f"{job_id}_{array_task}"
    log = str(submission.output).replace("%A", job_id).replace("%a", str(array_task)).replace("%j", job_id)
    jobs = read_jobs(run_dir) + [{
        "job_id": job_id, "array_task": array_task, "slurm_id": slurm_id, "script": str(submission.script_path),
        "log": log, "submitted": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}]
    atomic_write_json(run_dir / SLURM_DIR / JOBS_FILE, jobs)


def read_jobs(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / SLURM_DIR / JOBS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def refuse_if_active(run_dir: Path) -> None:
    """One job per run at a time: two jobs training into one run directory would corrupt it."""
    jobs = read_jobs(run_dir)
    state = job_state(jobs[-1]["slurm_id"]) if jobs else None
    if state and state.get("JobState") in ACTIVE_STATES:
        raise SlurmError(f"{run_dir} already has job {jobs[-1]['slurm_id']} ({state['JobState']}); wait for it, "
                         f"or `scancel {jobs[-1]['slurm_id']}` first")


def job_state(slurm_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, RunTime, NodeList, ExitCode, ...), or None
    when Slurm no longer knows the job (older than MinJobAge) or scontrol is missing."""
    if shutil.which("scontrol") is None:
        return None
    done = subprocess.run(["scontrol", "show", "job", "-o", slurm_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or "=" not in done.stdout:
        return None
    first_record = done.stdout.strip().splitlines()[0]
    return dict(field.split("=", 1) for field in first_record.split() if "=" in field)


# ---------------------------------------------------------------------------------------------
# Resubmitting an unfinished run


def resume_tasks(run_dir: Path, settings: SlurmSettings) -> list[RunTask]:
    """The run as the job will resume it: its saved config with this allocation's cluster settings."""
    run_dir = Path(run_dir).resolve()
    saved = run_dir / SLURM_DIR / "config.yaml"
    config_file = saved if saved.is_file() else run_dir / "config.yaml"
    if not config_file.is_file():
        raise SlurmError(f"{run_dir}: no {saved.relative_to(run_dir)} or config.yaml; is this a run directory?")
    config = load_config(config_file, cluster_overrides(settings))
    if run_dir_of(config) != run_dir:
        raise SlurmError(f"{config_file} belongs to run {config.run.name} in {config.run.workdir}, not {run_dir}")
    stages = RunState.load(run_dir).stages
    if stages and all(entry.get("status") == "done" for entry in stages.values()) and "eval" in stages:
        raise SlurmError(f"{run_dir} is finished (every stage done); nothing to resume")
    return [RunTask(config.run.name, run_dir, config)]


def saved_settings(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SLURM_DIR / "settings.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Status


def status_lines(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise SlurmError(f"{run_dir}: no such run directory")
    return [f"run        {run_dir.name}  ({run_dir})", _stages_line(run_dir), *_training_lines(run_dir),
            *_slurm_lines(run_dir), *_mlflow_lines(run_dir)]


def _stages_line(run_dir: Path) -> str:
    stages = RunState.load(run_dir).stages
    shown = [f"{name} {entry.get('status')}{' (reused)' if entry.get('reused') else ''}"
             for name, entry in stages.items()]
    return f"stages     {', '.join(shown) if shown else 'none started'}"


def _training_lines(run_dir: Path) -> list[str]:
    """From the files pipeline/checkpoint.py and pipeline/tracking.py document, read directly: importing
    those modules (torch, mlflow) would make `pretrain status` take seconds instead of a blink."""
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.is_file():
        tag = pointer.read_text(encoding="utf-8").strip()
        state = json.loads((pointer.parent / tag / "trainer_state.json").read_text(encoding="utf-8"))
        lines = [f"checkpoint {tag}  (step {state['step']}, {state['tokens_seen']:,} tokens)"]
    else:
        lines = ["checkpoint none yet"]
    last_loss = _last_train_loss(run_dir / "metrics.jsonl")
    return lines + ([f"training   step {last_loss[0]}, train loss {last_loss[1]:.4f}"] if last_loss else [])


def _last_train_loss(metrics_jsonl: Path) -> tuple[int, float] | None:
    if not metrics_jsonl.is_file():
        return None
    last = None
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut off by a crash
            continue
        if "train/loss" in record.get("metrics", {}):
            last = (record["step"], record["metrics"]["train/loss"])
    return last


def _slurm_lines(run_dir: Path) -> list[str]:
    jobs = read_jobs(run_dir)
    if not jobs:
        return ["slurm      no job submitted for this run"]
    job = jobs[-1]
    state = job_state(job["slurm_id"])
    if state is None:
        described = "no longer known to scontrol (finished more than MinJobAge ago; try sacct)"
    else:
        reason = state.get("Reason", "None")
        described = (f"{state.get('JobState')}{'' if reason in ('None', '(null)') else f' ({reason})'}, "
                     f"restarts {state.get('Restarts', '0')}, run time {state.get('RunTime')}, "
                     f"nodes {state.get('NodeList')}")
    earlier = f"; {len(jobs) - 1} earlier job(s)" if len(jobs) > 1 else ""
    return [f"slurm      job {job['slurm_id']}: {described}{earlier}", f"log        {job['log']}"]


def _mlflow_lines(run_dir: Path) -> list[str]:
    run_id_file, target_file = run_dir / "mlflow_run_id", run_dir / "mlflow_target.json"
    if not run_id_file.is_file():
        return ["mlflow     no MLflow run yet"]
    run_id = run_id_file.read_text(encoding="utf-8").strip()
    uri = json.loads(target_file.read_text(encoding="utf-8"))["uri"] if target_file.is_file() else ""
    if uri.startswith(("http://", "https://")):
        return [f"mlflow     {uri.rstrip('/')}/#/runs/{run_id}"]
    return [f"mlflow     run {run_id}{f' in {uri}' if uri else ''} (`pretrain ui` serves it)"]


# ---------------------------------------------------------------------------------------------
# The `pretrain submit` and `pretrain status` commands


def add_slurm_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `submit` and `status` on the `pretrain` command's subparsers."""
    submit_parser = subparsers.add_parser(
        "submit", help="run the pipeline as a Slurm job (Ray inside the allocation, requeue on preemption)",
        description="Validate CONFIG for the allocation, write the rendered slurm/pretrain.sbatch into the run "
        f"directory and sbatch it. Site defaults: --site FILE or ${SITE_ENV} (a YAML of Slurm settings).")
    submit_parser.add_argument("config", nargs="?", help="experiment YAML (omit with --resume)")
    submit_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-path config overrides")
    submit_parser.add_argument("--resume", metavar="RUN_DIR", help="resubmit an unfinished run (its saved "
                               "config and Slurm settings; flags override the settings)")
    submit_parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                               help="one run per combination of all --sweep values, as one job array")
    submit_parser.add_argument("--site", help=f"YAML of site Slurm settings (default: ${SITE_ENV})")
    submit_parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    for field, kind in FLAG_FIELDS.items():
        submit_parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind,
                                   help=SlurmSettings.model_fields[field].description)
    submit_parser.set_defaults(func=cmd_submit)
    status_parser = subparsers.add_parser("status", help="a run's checkpoint, Slurm job state and MLflow run")
    status_parser.add_argument("run_dir", help="the run directory (<workdir>/runs/<name>)")
    status_parser.set_defaults(func=cmd_status)


def cmd_submit(args: argparse.Namespace) -> int:
    flags = {field: getattr(args, field) for field in FLAG_FIELDS}
    if args.resume:
        if args.config or args.overrides or args.sweep:
            raise SlurmError("--resume RUN_DIR takes no CONFIG, overrides or --sweep: it reruns the saved config")
        settings = load_settings(args.site, flags, base=saved_settings(Path(args.resume)))
        tasks = resume_tasks(Path(args.resume), settings)
    elif args.config:
        settings = load_settings(args.site, flags)
        tasks = prepare_runs(args.config, args.overrides, args.sweep, settings)
    else:
        raise SlurmError("give a CONFIG to submit, or --resume RUN_DIR")
    submission = plan_submission(tasks, settings, sweep=bool(args.sweep))
    script = render_script(settings, tasks, output=submission.output, array=submission.array, chdir=Path.cwd())
    if args.dry_run:
        print(script, end="")
        return 0
    job_id = submit(submission, settings, script)
    print("\n".join(submitted_lines(job_id, submission)))
    return 0


def submitted_lines(job_id: str, submission: Submission) -> list[str]:
    tasks = submission.tasks
    experiment = tasks[0].config.tracking.experiment
    if submission.array is None:
        log = str(submission.output).replace("%j", job_id)
        return [f"submitted job {job_id}: run {tasks[0].name} (MLflow experiment {experiment})",
                f"  run dir  {tasks[0].run_dir}", f"  script   {submission.script_path}", f"  log      {log}",
                f"follow it: tail -f {log}  |  squeue -j {job_id}  |  pretrain status {tasks[0].run_dir}"]
    lines = [f"submitted array job {job_id}: {len(tasks)} runs in MLflow experiment {experiment}",
             f"  script   {submission.script_path}"]
    lines += [f"  {job_id}_{index}  {task.name}  {task.run_dir}" for index, task in enumerate(tasks)]
    logs = str(submission.output).replace("%A", job_id).replace("%a", "*")
    return lines + [f"follow it: tail -f {logs}  |  squeue -j {job_id}  |  pretrain status RUN_DIR"]


def cmd_status(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(Path(args.run_dir))))
    return 0


# ---------------------------------------------------------------------------------------------
# Helpers the rendered script runs inside the job: `python -m launch.slurm wait-ray|ray-summary`


def wait_for_ray_nodes(expected: int, timeout_s: float, watch_pids: list[int]) -> str:
    """Wait until `expected` nodes of the job's Ray ($RAY_ADDRESS) are alive; fail when a watched srun (the
    Ray head or workers) exits or the timeout passes. ray.init blocks without a timeout on a dead head, so
    the Ray side runs in a daemon thread that a failure abandons. Returns a one-line summary."""
    progress: dict[str, Any] = {"alive": 0}
    watcher = threading.Thread(target=_count_ray_nodes, args=(expected, progress), daemon=True)
    started = time.monotonic()
    watcher.start()
    while watcher.is_alive():
        watcher.join(timeout=1)
        exited = [pid for pid in watch_pids if not _pid_running(pid)]
        waited = time.monotonic() - started
        if watcher.is_alive() and (exited or waited > timeout_s):
            why = (f"the srun of a Ray node (pid {exited[0]}) exited; see its output above" if exited
                   else f"not within {timeout_s:.0f} s")
            raise SlurmError(f"only {progress['alive']} of {expected} nodes joined the Ray cluster at "
                             f"{os.environ.get('RAY_ADDRESS', 'auto')}: {why}")
    if "error" in progress:
        raise SlurmError(f"attaching to the Ray cluster failed: {progress['error']}")
    return (f"Ray cluster ready at {os.environ.get('RAY_ADDRESS', 'auto')}: {progress['alive']} nodes, "
            f"{progress['cpus']:g} CPUs, {progress['gpus']:g} GPUs after {time.monotonic() - started:.1f} s")


def _count_ray_nodes(expected: int, progress: dict[str, Any]) -> None:
    import ray

    try:
        ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
        while True:
            progress["alive"] = sum(1 for node in ray.nodes() if node["Alive"])
            if progress["alive"] >= expected:
                break
            time.sleep(1)
        resources = ray.cluster_resources()
        progress.update(cpus=resources.get("CPU", 0), gpus=resources.get("GPU", 0))
        ray.shutdown()
    except Exception as exc:  # reported by the waiting thread
        progress["error"] = f"{type(exc).__name__}: {exc}"


def _pid_running(pid: int) -> bool:
    """Alive and not a zombie (an exited srun stays a zombie until the batch script reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ray_summary() -> dict[str, Any]:
    """The job's Ray nodes and the nodes its Ray Train workers ran on (from the GCS actor table, which
    keeps finished actors; the state API would need the dashboard)."""
    import ray
    from ray._private.state import actors

    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
    try:
        nodes = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
                  "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes()]
        workers = [{"node_id": a["Address"]["NodeID"], "pid": a["Pid"], "state": a["State"]}
                   for a in actors().values() if a["ActorClassName"] == "RayTrainWorker"]
    finally:
        ray.shutdown()
    return {"job_id": os.environ.get("SLURM_JOB_ID"), "nodes": nodes, "train_workers": workers}


def _job_helper_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description="Helpers of the rendered "
                                     "sbatch script, run inside the job.")
    helpers = parser.add_subparsers(dest="helper", required=True)
    wait = helpers.add_parser("wait-ray", help="wait until every node joined the job's Ray cluster")
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, required=True)
    wait.add_argument("--watch", type=int, nargs="*", default=[], help="srun pids whose exit means failure")
    summary = helpers.add_parser("ray-summary", help="write the Ray nodes and training workers' nodes as JSON")
    summary.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.helper == "wait-ray":
            print(wait_for_ray_nodes(args.nodes, args.timeout, args.watch), flush=True)
        else:
            atomic_write_json(args.out, ray_summary())
    except SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)  # a thread may still block in ray.init; a normal exit would wait for Ray's shutdown hooks
    return 0


if __name__ == "__main__":
    sys.exit(_job_helper_main())
