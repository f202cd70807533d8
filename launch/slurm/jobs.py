"""Submitting with sbatch, the run's job record, resubmitting an unfinished run, and `pretrain status`."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launch.slurm.render import RunTask, cluster_overrides, sweep_base
from launch.slurm.settings import SlurmSettings
from pipeline.config import dump_config, load_config
from pipeline.errors import CheckpointError, SlurmError
from pipeline.run.artifacts import atomic_write_json, atomic_write_text
from pipeline.run.rundir import CONFIG_FILE, JOBS_FILE, METRICS_FILE, SLURM_DIR, TARGET_FILE, RunState, run_dir_of
from pipeline.tracking.journal import last_metric, mlflow_run_id
from pipeline.tracking.names import METRIC_TRAIN_LOSS
from pipeline.training.checkpoint import latest_tag, read_trainer_state, resolve_checkpoint

# Job states in which a run already has a job that will (re)start or is running.
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
}


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
    sweep_dir = Path(tasks[0].config.run.workdir) / "sweeps" / f"{sweep_base(tasks)}-{stamp}"
    limit = f"%{settings.array_parallel}" if settings.array_parallel else ""
    return Submission(tasks, sweep_dir / "job.sbatch", sweep_dir / "%A_%a.out", f"0-{len(tasks) - 1}{limit}")


def submit(submission: Submission, settings: SlurmSettings, script: str) -> str:
    """Write the configs, settings and script (atomically), call sbatch, record the job in each run."""
    for task in submission.tasks:
        refuse_if_active(task.run_dir)
    for task in submission.tasks:
        slurm_dir = task.run_dir / SLURM_DIR
        atomic_write_text(slurm_dir / CONFIG_FILE, dump_config(task.config))
        atomic_write_text(slurm_dir / "settings.yaml", yaml.safe_dump(settings.model_dump(), sort_keys=False))
    atomic_write_text(submission.script_path, script)
    if submission.array is not None:
        atomic_write_json(
            submission.script_path.parent / "tasks.json",
            [{"run": t.name, "run_dir": t.run_dir, "overrides": list(t.combination)} for t in submission.tasks],
        )
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
    jobs = read_jobs(run_dir) + [
        {
            "job_id": job_id,
            "array_task": array_task,
            "slurm_id": slurm_id,
            "script": str(submission.script_path),
            "log": log,
            "submitted": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
    ]
    atomic_write_json(run_dir / SLURM_DIR / JOBS_FILE, jobs)


def read_jobs(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / SLURM_DIR / JOBS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def refuse_if_active(run_dir: Path) -> None:
    """One job per run at a time: two jobs training into one run directory would corrupt it."""
    jobs = read_jobs(run_dir)
    state = job_state(jobs[-1]["slurm_id"]) if jobs else None
    if state and state.get("JobState") in ACTIVE_STATES:
        raise SlurmError(
            f"{run_dir} already has job {jobs[-1]['slurm_id']} ({state['JobState']}); wait for it, "
            f"or `scancel {jobs[-1]['slurm_id']}` first"
        )


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
    saved = run_dir / SLURM_DIR / CONFIG_FILE
    config_file = saved if saved.is_file() else run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise SlurmError(f"{run_dir}: no {saved.relative_to(run_dir)} or {CONFIG_FILE}; is this a run directory?")
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
    return [
        f"run        {run_dir.name}  ({run_dir})",
        _stages_line(run_dir),
        *_training_lines(run_dir),
        *_slurm_lines(run_dir),
        *_mlflow_lines(run_dir),
    ]


def _stages_line(run_dir: Path) -> str:
    stages = RunState.load(run_dir).stages
    shown = [
        f"{name} {entry.get('status')}{' (reused)' if entry.get('reused') else ''}" for name, entry in stages.items()
    ]
    return f"stages     {', '.join(shown) if shown else 'none started'}"


def _training_lines(run_dir: Path) -> list[str]:
    try:
        tag = latest_tag(run_dir)
    except CheckpointError as exc:
        return [f"checkpoint {exc}"]
    if tag is not None:
        state = read_trainer_state(resolve_checkpoint(run_dir, tag))
        lines = [f"checkpoint {tag}  (step {state['step']}, {state['tokens_seen']:,} tokens)"]
    else:
        lines = ["checkpoint none yet"]
    last_loss = last_metric(run_dir / METRICS_FILE, METRIC_TRAIN_LOSS)
    return lines + ([f"training   step {last_loss[0]}, train loss {last_loss[1]:.4f}"] if last_loss else [])


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
        described = (
            f"{state.get('JobState')}{'' if reason in ('None', '(null)') else f' ({reason})'}, "
            f"restarts {state.get('Restarts', '0')}, run time {state.get('RunTime')}, "
            f"nodes {state.get('NodeList')}"
        )
    earlier = f"; {len(jobs) - 1} earlier job(s)" if len(jobs) > 1 else ""
    return [f"slurm      job {job['slurm_id']}: {described}{earlier}", f"log        {job['log']}"]


def _mlflow_lines(run_dir: Path) -> list[str]:
    run_id, target_file = mlflow_run_id(run_dir), run_dir / TARGET_FILE
    if run_id is None:
        return ["mlflow     no MLflow run yet"]
    uri = json.loads(target_file.read_text(encoding="utf-8"))["uri"] if target_file.is_file() else ""
    if uri.startswith(("http://", "https://")):
        return [f"mlflow     {uri.rstrip('/')}/#/runs/{run_id}"]
    return [f"mlflow     run {run_id}{f' in {uri}' if uri else ''} (`pretrain ui` serves it)"]
