"""`pretrain run`: tokenizer -> shard -> train -> eval on a Ray cluster, one MLflow run per pipeline run.

The tokenizer and eval stages run as Ray tasks, the shard stage as a Ray Data job and the train stage
as a Ray Train worker group, all on the Ray cluster named by `cluster.address` (an embedded local Ray
by default). Data artifacts come from the content-addressed cache, so a second run with the same data
and tokenizer settings only trains. `<run_dir>/run.json` records each stage's status and output, so
`--from`/`--only` can start later stages from the artifacts of earlier ones, and a rerun of an
unfinished run resumes it from its latest checkpoint.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.artifacts import atomic_write_json, atomic_write_text
from pipeline.config import Config, ConfigError, dump_config

STAGES = ("tokenizer", "shard", "train", "eval")
RUN_STATE = "run.json"


class StageFailed(RuntimeError):
    """A stage raised: names the stage; earlier stages' artifacts are kept."""

    def __init__(self, stage: str, cause: BaseException, log: Path):
        super().__init__(f"stage `{stage}` failed: {type(cause).__name__}: {cause} (traceback: {log}; "
                         f"artifacts of earlier stages are kept)")
        self.stage = stage


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


@dataclass
class RunState:
    """What run.json records: per stage {status, path, reused, fingerprint, figures, finished}."""
    path: Path
    stages: dict

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        file = run_dir / RUN_STATE
        stages = json.loads(file.read_text())["stages"] if file.exists() else {}
        return cls(file, stages)

    def record(self, stage: str, status: str, **fields) -> None:
        entry = self.stages.setdefault(stage, {})
        entry.update(status=status, updated=_now(), **fields)
        atomic_write_json(self.path, {"stages": self.stages})

    def output(self, stage: str) -> Path:
        entry = self.stages.get(stage, {})
        if entry.get("status") != "done":
            raise ConfigError(f"{self.path}: stage `{stage}` has not completed in this run; run "
                              f"`pretrain run CONFIG --only {stage}` (or without --from/--only) first")
        return Path(entry["path"])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def select_stages(only: str | None = None, from_stage: str | None = None, until: str | None = None
                  ) -> list[str]:
    """The stages to run, in order: one (`only`), or from `from_stage` (default first) to `until`."""
    if only and (from_stage or until):
        raise ConfigError("give --only, or --from (and an end stage), not both")
    for name in (only, from_stage, until):
        if name is not None and name not in STAGES:
            raise ConfigError(f"unknown stage `{name}`; stages are {', '.join(STAGES)}")
    if only:
        return [only]
    first = STAGES.index(from_stage) if from_stage else 0
    last = STAGES.index(until) if until else len(STAGES) - 1
    return list(STAGES[first:last + 1])


def prepare_run_dir(config: Config) -> Path:
    """Create the run directory and write the resolved config (kept across resumes for comparison)."""
    run_dir = run_dir_of(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(config))
    return run_dir


def connect_ray(config: Config) -> None:
    """Attach to `cluster.address`, or start an embedded Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if config.cluster.address:
        ray.init(address=config.cluster.address, log_to_driver=True)
        return
    # A short temp root: Ray's unix socket paths must stay under 107 characters.
    temp_root = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "pretrain-ray"
    ray.init(include_dashboard=False, _temp_dir=str(temp_root), configure_logging=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}})


def run_pipeline(config: Config, *, only: str | None = None, from_stage: str | None = None,
                 until: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run the selected stages in order; returns {stage: figures}. Raises StageFailed naming the stage."""
    from pipeline.tracking import environment_tags, open_tracker

    stages = select_stages(only, from_stage, until)
    config = absolute_paths(config)
    run_dir = prepare_run_dir(config)
    state = RunState.load(run_dir)
    connect_ray(config)
    tracker = open_tracker(config, run_dir, rank=0)
    tracker.log_params(config.model_dump(mode="json"))
    tracker.set_tags(environment_tags(config))
    tracker.log_artifact(run_dir / "config.yaml")
    echo(f"run {config.run.name}: {run_dir} (stages: {', '.join(stages)})")
    results = {}
    try:
        for stage in stages:
            results[stage] = _run_stage(stage, config, run_dir, state, tracker, echo)
    except StageFailed:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return results


def _run_stage(stage: str, config: Config, run_dir: Path, state: RunState, tracker, echo) -> dict:
    from pipeline.tracking import log_stage

    started = time.perf_counter()
    state.record(stage, "running")
    tracker.set_tags({f"stage.{stage}": "running"})
    try:
        output, figures, reused = STAGE_RUNNERS[stage](config, run_dir, state, tracker)
    except (KeyboardInterrupt, SystemExit):
        state.record(stage, "interrupted")
        raise
    except Exception as exc:
        log = run_dir / "logs" / f"{stage}-error.txt"
        atomic_write_text(log, traceback.format_exc())
        state.record(stage, "failed", error=f"{type(exc).__name__}: {exc}")
        log_stage(tracker, stage, {}, "failed")
        raise StageFailed(stage, exc, log) from exc
    seconds = round(time.perf_counter() - started, 1)
    state.record(stage, "done", path=str(output), reused=reused, figures=figures, seconds=seconds)
    log_stage(tracker, stage, figures, "done")
    echo(f"{stage}: {'reused ' if reused else ''}{output} ({seconds} s)")
    return figures


def _tokenizer(config: Config, run_dir: Path, state: RunState, tracker):
    import ray

    from pipeline.tokenizer import tokenizer_stage

    result = ray.get(ray.remote(num_cpus=1)(tokenizer_stage).remote(config))
    tracker.log_artifact(result.path / "tokenizer.json", "tokenizer")
    return result.path, result.manifest.get("figures", {}), result.reused


def _shard(config: Config, run_dir: Path, state: RunState, tracker):
    from pipeline.shard import shard_stage

    result = shard_stage(config)
    return result.path, result.manifest.get("figures", {}), result.reused


def _train(config: Config, run_dir: Path, state: RunState, tracker):
    from pipeline.train import run_training

    shard_dir = state.output("shard")
    figures = run_training(config, shard_dir, run_dir)
    return run_dir / "checkpoints", figures, False


def _eval(config: Config, run_dir: Path, state: RunState, tracker):
    import ray

    from pipeline.evaluate import evaluate_run
    from pipeline.tracking import loss_curve_png

    remote = ray.remote(num_cpus=1, num_gpus=1 if config.cluster.use_gpu else 0)(evaluate_run)
    report = ray.get(remote.remote(config, run_dir, state.output("shard"), state.output("tokenizer")))
    for name in ("report.json", "summary.txt"):
        tracker.log_artifact(run_dir / "eval" / name, "eval")
    curve = run_dir / "eval" / "loss_curve.png"
    loss_curve_png(run_dir / "metrics.jsonl", curve)
    tracker.log_artifact(curve, "eval")
    return run_dir / "eval", report.get("metrics", report), False


STAGE_RUNNERS = {"tokenizer": _tokenizer, "shard": _shard, "train": _train, "eval": _eval}
