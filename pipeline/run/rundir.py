"""The run directory: every file name in it, the stage record (`RunState`).

    <workdir>/runs/<name>/
        config.yaml               the config as the user gave it (derived values recomputed on load)
        init_from.json            what model.init_from held at the start: path, sha256 of the weights
        branch.json               a branch's parent: run directory, MLflow run id, checkpoint, step
        config_history.json       what each later attempt (resume, rerun) changed in config.yaml
        run.lock                  flock of the process running the run, with its PID and host
        run.json                  per stage: status, output path, reused, fingerprint, figures, seconds
        stage_summary.json        every stage's figures as one table (an MLflow artifact)
        logs/                     tracebacks of failed stages and ranks, library output
        deepspeed_config.json     the exact JSON DeepSpeed got
        train_result.json         training's figures and stop flag, when run under torchrun
        checkpoint_request        written by the driver on SIGUSR1/SIGTERM, read by rank 0
        checkpoints/              the checkpoint manager's (pipeline/training/checkpoint.py)
        eval/                     report.json, summary.txt, samples, loss_curve.png
        metrics.jsonl, mlflow_*   the durable tracking journal (pipeline/tracking/journal.py)
        slurm/                    jobs.json, the rendered job script, its config and settings

Nothing here imports torch, deepspeed, ray or mlflow: the CLI, the Slurm job helpers and the status
command read run directories without them. Only this module knows these names.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_changes, dump_config, load_config
from pipeline.errors import ConfigError
from pipeline.run.artifacts import atomic_write_json, atomic_write_text

STAGES = ("tokenizer", "shard", "train", "eval")

CONFIG_FILE = "config.yaml"
INIT_FROM_FILE = "init_from.json"
BRANCH_FILE = "branch.json"  # written by `pretrain branch` (pipeline/run/branch.py)
CONFIG_HISTORY_FILE = "config_history.json"  # every change of config.yaml between attempts of the run
LOCK_FILE = "run.lock"  # flock held by the process running the run (pipeline/run/guard.py)
RUN_STATE_FILE = "run.json"
STAGE_SUMMARY_FILE = "stage_summary.json"
LOGS_DIR = "logs"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
TRAIN_RESULT_FILE = "train_result.json"  # written under torchrun only: Ray returns the result
REQUEST_FILE = "checkpoint_request"
EVAL_DIR = "eval"
REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.txt"
LOSS_CURVE_FILE = "loss_curve.png"
PROFILE_DIR = "profile"
SLURM_DIR = "slurm"
JOBS_FILE = "jobs.json"
# The tracking journal (written by rank 0 and the driver, sent to MLflow by the driver).
METRICS_FILE = "metrics.jsonl"
METRICS_SYNCED_FILE = "metrics.synced"
OPS_FILE = "mlflow_ops.jsonl"
OPS_SYNCED_FILE = "mlflow_ops.synced"
RUN_ID_FILE = "mlflow_run_id"
TARGET_FILE = "mlflow_target.json"

CHECKPOINTS_DIR = "checkpoints"  # layout inside: pipeline/training/checkpoint.py


def run_dir_of(config: Config) -> Path:
    return Path(config.run.workdir).resolve() / "runs" / config.run.name


def absolute_paths(config: Config) -> Config:
    """Resolve the workdir and local source paths against the driver's cwd: Ray tasks may run elsewhere."""
    config = config.model_copy(deep=True)
    config.run.workdir = str(Path(config.run.workdir).resolve())
    for source in config.data.sources:
        if ":" not in source.path.split("/")[0]:  # not builtin:..., hf:...
            source.path = str(Path(source.path).expanduser().absolute())
    for section, key in (("model", "init_from"), ("tokenizer", "path")):
        if getattr(getattr(config, section), key) is not None:
            setattr(getattr(config, section), key, str(Path(getattr(getattr(config, section), key)).absolute()))
    return config


def prepare_run_dir(config: Config, started_from: dict | None = None) -> tuple[Path, dict[str, tuple[Any, Any]]]:
    """Create the run directory and write the config atomically. Returns the changes against the
    config.yaml an earlier attempt of the run wrote ({} for a new run), and appends them, when there
    are any, to config_history.json (time and {key: [old, new]} per attempt). `started_from`, the
    record of model.init_from's weights at a fresh start, goes to init_from.json and, as a comment,
    into config.yaml."""
    run_dir = run_dir_of(config)
    (run_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    if started_from is not None:
        atomic_write_json(run_dir / INIT_FROM_FILE, started_from)
    previous = run_dir / CONFIG_FILE
    try:
        changes = config_changes(load_config(previous).model_dump(mode="json"), config) if previous.is_file() else {}
    except ConfigError:  # written by an older version of the schema: nothing to compare with
        changes = {}
    if changes:
        history = config_history(run_dir) + [{"time": _now(), "changes": {k: list(v) for k, v in changes.items()}}]
        atomic_write_json(run_dir / CONFIG_HISTORY_FILE, history)
    atomic_write_text(previous, dump_config(config) + _started_from_comment(run_dir))
    return run_dir, changes


def started_from(run_dir: Path) -> dict | None:
    """init_from.json: {"path", "sha256", "files"} of the weights the run started from, or None."""
    path = Path(run_dir) / INIT_FROM_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def branch_record(run_dir: Path) -> dict | None:
    """branch.json of a branch's run directory, or None."""
    path = Path(run_dir) / BRANCH_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _started_from_comment(run_dir: Path) -> str:
    record = started_from(run_dir)
    return f"# Started from the weights in {record['path']}, sha256 {record['sha256']}\n" if record else ""


def config_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / CONFIG_HISTORY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def config_path(run_dir: Path) -> Path:
    """`<run_dir>/config.yaml`, or ConfigError when run_dir is not a run directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_dir}: not a run directory (no {CONFIG_FILE}); give the directory "
            "`pretrain run` printed, e.g. <workdir>/runs/<name>"
        )
    return path


def save_traceback(run_dir: Path, name: str, text: str) -> Path | None:
    """Keep the traceback of `name` (a stage, a rank) in `<run_dir>/logs/<name>-error.txt`; None when it
    cannot be written (a full disk is often why the run failed): the error itself must still be told."""
    path = Path(run_dir) / LOGS_DIR / f"{name}-error.txt"
    try:
        atomic_write_text(path, text)
    except OSError:
        return None
    return path


@dataclass
class RunState:
    """What run.json records: per stage {status, path, reused, fingerprint, figures, updated, ...}."""

    path: Path
    stages: dict

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        file = Path(run_dir) / RUN_STATE_FILE
        stages = json.loads(file.read_text(encoding="utf-8"))["stages"] if file.exists() else {}
        return cls(file, stages)

    def record(self, stage: str, status: str, **fields) -> None:
        entry = self.stages.setdefault(stage, {})
        entry.update(status=status, updated=_now(), **fields)
        atomic_write_json(self.path, {"stages": self.stages})

    def output(self, stage: str) -> Path:
        entry = self.stages.get(stage, {})
        if entry.get("status") != "done":
            raise ConfigError(
                f"{self.path}: stage `{stage}` has not completed in this run; run "
                f"`pretrain run CONFIG --only {stage}` (or without --from/--only) first"
            )
        return Path(entry["path"])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
