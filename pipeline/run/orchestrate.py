"""`pretrain run`: tokenizer -> shard -> train -> eval on a Ray cluster, one MLflow run per pipeline run.

The tokenizer and shard stages run one Ray task per input partition (the driver plans and merges), the
train stage a Ray Train worker group and the eval stage one Ray task, all on the Ray cluster named by
`cluster.address` (an embedded local Ray by default). Data artifacts come from the content-addressed
cache, so a second run with the same data and tokenizer settings only trains. `<run_dir>/run.json`
records each stage's status and output, so `--from`/`--only` can start later stages from the artifacts
of earlier ones, and a rerun of an unfinished run resumes it from its latest checkpoint.

This driver owns the run: its directory, its stage record and its MLflow run. Training ranks append to
the run's journal; the driver sends that to MLflow while they train and sets the run's status once,
after the last stage. A user error, wherever it was raised (here, in a Ray task, in a training rank),
ends the run with one line naming the stage; its traceback is in `<run_dir>/logs/`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, RunStopped, StageFailed, UserError
from pipeline.run.artifacts import StageResult, atomic_write_json, read_manifest
from pipeline.run.guard import run_lock, writable_run_dir
from pipeline.run.rundir import (
    CONFIG_FILE,
    CONFIG_HISTORY_FILE,
    DEEPSPEED_CONFIG_FILE,
    EVAL_DIR,
    INIT_FROM_FILE,
    LOSS_CURVE_FILE,
    METRICS_FILE,
    REPORT_FILE,
    STAGES,
    SUMMARY_FILE,
    RunState,
    absolute_paths,
    branch_record,
    config_path,
    prepare_run_dir,
    run_dir_of,
    save_traceback,
    started_from,
)
from pipeline.run.runtime import ray_connection, remote_cause
from pipeline.training.checkpoint import (
    CHECKPOINT_MANIFEST,
    checkpoints_dir,
    complete_checkpoints,
    latest_tag,
    read_trainer_state,
    resume_point,
    select_intact,
)


@dataclass
class StageOutput:
    """What a stage hands back: its artifact directory, its figures, whether the cache served it, the
    training step its figures belong to (eval figures are logged at the evaluated step), and whether
    it stopped on request (training only)."""

    path: Path
    figures: dict
    reused: bool = False
    step: int = 0
    stopped: bool = False
    interrupted: bool = False


def select_stages(only: str | None = None, from_stage: str | None = None, until: str | None = None) -> list[str]:
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
    return list(STAGES[first : last + 1])


def run_pipeline(
    config: Config,
    *,
    only: str | None = None,
    from_stage: str | None = None,
    until: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the selected stages in order; returns {stage: figures}. Raises StageFailed naming the stage."""
    from pipeline.tracking.store import open_tracker

    stages = select_stages(only, from_stage, until)
    config = absolute_paths(config)
    with run_lock(writable_run_dir(run_dir_of(config))):
        select_intact(run_dir_of(config), config.train.verify_checkpoints, echo)  # damaged ones skipped
        point = resume_point(run_dir_of(config), config)  # a refused change is refused before anything is written
        run_dir, changes = prepare_run_dir(config, weights_at_start(config, point))
        tracker = open_tracker(config, run_dir)
        record_config(tracker, config, run_dir, changes)
        echo(f"run {config.run.name}: {run_dir} (stages: {', '.join(stages)})")
        return _run_stages(stages, config, run_dir, tracker, echo)


def weights_at_start(config: Config, point) -> dict | None:
    """The record of model.init_from's weights (path, sha256) when a run starts from them: a fresh start
    (no checkpoint to resume) with init_from set. Fails at once on a directory without weights."""
    if config.model.init_from is None or point is not None:
        return None
    from pipeline.training.pretrained import weights_record

    return weights_record(config.model.init_from)


def record_config(tracker, config: Config, run_dir: Path, changes: dict) -> None:
    """The config as MLflow params (those of the first attempt: MLflow keeps a param's first value),
    and what later attempts changed: the keys' current values as `config.<key>` tags and the
    config_history.json table."""
    from pipeline.tracking.local import environment_tags

    tracker.log_params(config.model_dump(mode="json"))
    tracker.set_tags(environment_tags(config))
    if config.tracking.parent_run_id:  # a sweep's trial, nested under the sweep's run in the UI
        tracker.set_tags({"mlflow.parentRunId": config.tracking.parent_run_id})
    tracker.log_artifact(run_dir / CONFIG_FILE)
    branch = branch_record(run_dir)
    if branch is not None:  # tags, not mlflow.parentRunId: a branch is no nested child in the UI
        tags = {"parent_run_id": branch["parent_mlflow_run_id"], "checkpoint": branch["checkpoint"]}
        tracker.set_tags({f"branch.{key}": value for key, value in tags.items() if value is not None})
    weights = started_from(run_dir)
    if weights is not None:
        tracker.log_params({"init_from": {"path": weights["path"], "sha256": weights["sha256"]}})
        tracker.log_artifact(run_dir / INIT_FROM_FILE)
    if changes:
        tracker.set_tags({f"config.{key}": new for key, (_, new) in changes.items()})
        tracker.log_artifact(run_dir / CONFIG_HISTORY_FILE)


def _run_stages(stages: list[str], config: Config, run_dir: Path, tracker, echo: Callable[[str], None]) -> dict:
    state = RunState.load(run_dir)
    results, status = {}, "FAILED"
    try:
        with ray_connection(config), checkpoint_requests_outside_training(echo):
            for stage in stages:
                output = _run_stage(stage, config, run_dir, state, tracker, echo)
                results[stage] = output.figures
                if output.stopped:
                    status = "KILLED"
                    raise RunStopped(run_dir, output.step, output.interrupted)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with contextlib.suppress(OSError):  # a full disk: the error being raised is the one to tell
            tracker.finish(status)
    return results


@contextmanager
def checkpoint_requests_outside_training(echo: Callable[[str], None]):
    """SIGUSR1 asks training for a checkpoint (Slurm sends it before the time limit); in the other
    stages there is nothing to save, and its default action would kill the pipeline: say so, go on.
    The train stage installs its own handler while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(
        signal.SIGUSR1, lambda signum, frame: echo("SIGUSR1 outside training: no checkpoint to write, continuing")
    )
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _run_stage(stage: str, config: Config, run_dir: Path, state: RunState, tracker, echo) -> StageOutput:
    from pipeline.tracking.local import log_stage

    started = time.perf_counter()
    state.record(stage, "running")
    tracker.set_tags({f"stage.{stage}": "running"})
    echo(f"{stage}: {stage_description(stage, config)}")
    try:
        output = STAGE_RUNNERS[stage](config, run_dir, state, tracker, echo)
    except (KeyboardInterrupt, SystemExit):
        state.record(stage, "interrupted")
        raise
    except Exception as exc:
        cause = remote_cause(exc)
        log = save_traceback(run_dir, stage, "".join(traceback.format_exception(exc)))
        with contextlib.suppress(OSError):  # a full disk may be why it failed: the cause still gets told
            state.record(stage, "failed", error=f"{type(cause).__name__}: {cause}")
            log_stage(tracker, stage, {}, "failed")
        shown = str(cause) if isinstance(cause, UserError) else f"{type(cause).__name__}: {cause}"
        raise StageFailed(stage, shown, log) from exc
    seconds = round(time.perf_counter() - started, 1)
    status = "stopped" if output.stopped else "done"
    state.record(stage, status, path=str(output.path), reused=output.reused, figures=output.figures, seconds=seconds)
    log_stage(tracker, stage, output.figures, status, step=output.step)
    echo(f"{stage}: {'reused ' if output.reused else ''}{output.path} ({seconds} s)")
    return output


STAGE_DESCRIPTIONS = {
    "tokenizer": "train a byte-level BPE tokenizer on a sample of the corpus (or reuse a cached one)",
    "shard": "tokenize and pack the corpus into token shards (or reuse cached ones)",
    "train": "DeepSpeed training in a Ray Train worker group",
    "eval": "validation loss, perplexity, bits per byte and samples of the latest checkpoint",
}


def stage_description(stage: str, config: Config) -> str:
    if stage == "tokenizer" and config.tokenizer.path:
        return f"check and cache the tokenizer of {config.tokenizer.path} (tokenizer.path)"
    if stage == "train" and config.model.init_from:
        return f"{STAGE_DESCRIPTIONS[stage]}, from the weights in {config.model.init_from}"
    return STAGE_DESCRIPTIONS[stage]


def _tokenizer(config: Config, run_dir: Path, state: RunState, tracker, echo: Callable[[str], None]) -> StageOutput:
    from pipeline.data.tokenizer import tokenizer_stage

    result = tokenizer_stage(config)
    tracker.log_artifact(result.path / "tokenizer.json", "tokenizer")
    return StageOutput(result.path, result.manifest.get("figures", {}), result.reused)


def _shard(config: Config, run_dir: Path, state: RunState, tracker, echo: Callable[[str], None]) -> StageOutput:
    from pipeline.data.shard import shard_stage

    tokenizer_dir = state.output("tokenizer")
    result = shard_stage(config, StageResult(tokenizer_dir, read_manifest(tokenizer_dir), reused=True))
    return StageOutput(result.path, result.manifest.get("figures", {}), result.reused)


def _train(config: Config, run_dir: Path, state: RunState, tracker, echo: Callable[[str], None]) -> StageOutput:
    from pipeline.training.ray_train import run_training

    shard_dir = state.output("shard")
    with tracker.syncing():
        result = run_training(config, shard_dir, run_dir, echo)
    tracker.log_artifact(run_dir / DEEPSPEED_CONFIG_FILE)
    tracker.log_artifact(write_checkpoint_manifest(run_dir), "checkpoints")
    return StageOutput(
        checkpoints_dir(run_dir),
        result.figures,
        step=result.steps,
        stopped=result.stopped,
        interrupted=result.interrupted,
    )


def _eval(config: Config, run_dir: Path, state: RunState, tracker, echo: Callable[[str], None]) -> StageOutput:
    import ray

    from pipeline.eval.stage import evaluate_run

    # DEFAULT scheduling: wherever a CPU is free, outside a placement group the caller may hold (a sweep
    # trial's actor holds one with room for itself only).
    gpus = 1 if config.cluster.use_gpu else 0
    remote = ray.remote(num_cpus=1, num_gpus=gpus, scheduling_strategy="DEFAULT")(evaluate_run)
    report = ray.get(remote.remote(config, run_dir, state.output("shard"), state.output("tokenizer")))
    return log_eval_artifacts(tracker, run_dir, report)


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


def log_eval_artifacts(tracker, run_dir: Path, report: dict) -> StageOutput:
    """Attach the report, the summary and a fresh loss curve to the run; the metrics go at the
    evaluated checkpoint's step so they line up with the training curves."""
    from pipeline.tracking.plot import loss_curve_png

    eval_dir = run_dir / EVAL_DIR
    for name in (REPORT_FILE, SUMMARY_FILE):
        tracker.log_artifact(eval_dir / name, EVAL_DIR)
    curve = loss_curve_png(run_dir / METRICS_FILE, eval_dir / LOSS_CURVE_FILE)
    if curve is not None:
        tracker.log_artifact(curve, EVAL_DIR)
    return StageOutput(eval_dir, report["metrics"], step=int(report["step"]))


def evaluate_existing_run(
    run_dir: Path, checkpoint_tag: str | None = None, overrides: list[str] = (), **lm_eval
) -> dict:
    """`pretrain eval RUN_DIR [eval.KEY=VALUE ...]`: evaluate in this process and log to the run's own
    MLflow run. Only the eval section may be overridden: anything else would score another model."""
    from pipeline.eval.stage import evaluate_run
    from pipeline.tracking.local import log_stage
    from pipeline.tracking.store import open_tracker

    run_dir = Path(run_dir).resolve()
    for text in overrides:
        if not text.startswith("eval."):
            raise ConfigError(f"`pretrain eval` takes eval.* overrides only, not `{text}`; e.g. eval.max_windows=1024")
    config = load_config(config_path(run_dir), list(overrides))
    state = RunState.load(run_dir)
    report = evaluate_run(
        config, run_dir, state.output("shard"), state.output("tokenizer"), checkpoint_tag=checkpoint_tag, **lm_eval
    )
    tracker = open_tracker(config, run_dir)
    output = log_eval_artifacts(tracker, run_dir, report)
    log_stage(tracker, "eval", output.figures, "done", step=output.step)
    tracker.finish("FINISHED")  # open_tracker marked the reopened run RUNNING
    return report


STAGE_RUNNERS = {"tokenizer": _tokenizer, "shard": _shard, "train": _train, "eval": _eval}
