"""The run directory: every file name in it, the stage record (`RunState`) and checkpoint discovery.

    <workdir>/runs/<name>/
        config.yaml               the config as the user gave it (derived values recomputed on load)
        run.json                  per stage: status, output path, reused, fingerprint, figures, seconds
        logs/                     tracebacks of failed stages and ranks, library output
        deepspeed_config.json     the exact JSON DeepSpeed got
        train_result.json         training's figures and stop flag, when run under torchrun
        checkpoint_request        written by the driver on SIGUSR1/SIGTERM, read by rank 0
        checkpoints/              see below; `manifest.json` lists the complete ones
        eval/                     report.json, summary.txt, samples, loss_curve.png
        metrics.jsonl, mlflow_*   the durable tracking journal (pipeline/tracking/journal.py)
        slurm/                    jobs.json, the rendered job script, its config and settings

    checkpoints/
        latest                    the tag of the newest complete checkpoint, replaced atomically
        step-00000500/            DeepSpeed engine state, trainer_state.json, rng/, COMPLETE

Nothing here imports torch, deepspeed, ray or mlflow: the CLI, the Slurm job helpers and the status
command read run directories without them. Only this module knows these names.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import atomic_write_json, atomic_write_text
from pipeline.config import Config, dump_config
from pipeline.errors import CheckpointError, ConfigError

STAGES = ("tokenizer", "shard", "train", "eval")

CONFIG_FILE = "config.yaml"
RUN_STATE_FILE = "run.json"
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

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_MANIFEST = "manifest.json"
_TAG = re.compile(r"^step-(\d{8})$")


def run_dir_of(config: Config) -> Path:
    return Path(config.run.workdir).resolve() / "runs" / config.run.name


def absolute_paths(config: Config) -> Config:
    """Resolve the workdir and local source paths against the driver's cwd: Ray tasks may run elsewhere."""
    config = config.model_copy(deep=True)
    config.run.workdir = str(Path(config.run.workdir).resolve())
    for source in config.data.sources:
        if ":" not in source.path.split("/")[0]:  # not builtin:..., hf:...
            source.path = str(Path(source.path).expanduser().absolute())
    return config


def prepare_run_dir(config: Config) -> Path:
    """Create the run directory and write the config (atomically; kept across resumes for comparison)."""
    run_dir = run_dir_of(config)
    (run_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(config))
    return run_dir


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


# ---------------------------------------------------------------------------------------------
# Checkpoint discovery


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def latest_pointer(run_dir: Path) -> str | None:
    """The tag `latest` names, complete or not; None when there is no pointer."""
    pointer = checkpoints_dir(run_dir) / LATEST
    return pointer.read_text(encoding="utf-8").strip() or None if pointer.is_file() else None


def latest_tag(run_dir: Path) -> str | None:
    """The tag `latest` points at, when that checkpoint is complete; None for a fresh run."""
    tag = latest_pointer(run_dir)
    if tag is None:
        return None
    if not is_complete(checkpoints_dir(run_dir) / tag):
        raise CheckpointError(
            f"{checkpoints_dir(run_dir) / LATEST} names {tag!r}, which is not a complete "
            "checkpoint; point it at a complete step-* directory or delete it to start over"
        )
    return tag


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE).is_file()


def tag_dirs(run_dir: Path) -> list[Path]:
    """Every step-* directory under checkpoints/, complete or not, oldest first."""
    root = checkpoints_dir(run_dir)
    return sorted(p for p in root.glob("step-*") if p.is_dir() and _TAG.match(p.name)) if root.is_dir() else []


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in tag_dirs(run_dir) if is_complete(p)]


def resolve_checkpoint(run_dir: Path, tag: str | None = None) -> Path:
    """The directory of checkpoint `tag`, or of `latest`; CheckpointError naming what exists otherwise."""
    root = checkpoints_dir(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise CheckpointError(f"{root}: no checkpoint; train the run first (`pretrain run CONFIG`)")
    if not is_complete(root / tag):
        available = [p.name for p in complete_checkpoints(run_dir)]
        raise CheckpointError(f"{root / tag}: not a complete checkpoint; pick one of {available or 'none'}")
    return root / tag


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))


def write_checkpoint_manifest(run_dir: Path) -> Path:
    """`checkpoints/manifest.json`: every complete checkpoint's step, tokens seen, world size and files
    with their sizes, and which one `latest` names (the weights stay out of MLflow: they can be large)."""
    entries = []
    for path in complete_checkpoints(run_dir):
        trainer = read_trainer_state(path)
        files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
        entries.append(
            {
                "tag": path.name,
                "step": trainer["step"],
                "tokens_seen": trainer["tokens_seen"],
                "world_size": trainer["world_size"],
                "bytes": sum(files.values()),
                "files": files,
            }
        )
    manifest = checkpoints_dir(run_dir) / CHECKPOINT_MANIFEST
    atomic_write_json(manifest, {"latest": latest_tag(run_dir), "checkpoints": entries})
    return manifest
