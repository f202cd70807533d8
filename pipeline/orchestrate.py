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
import math
import os
import signal
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.artifacts import atomic_write_json, atomic_write_text
from pipeline.config import Config, ConfigError, dump_config

STAGES = ("tokenizer", "shard", "train", "eval")
RUN_STATE = "run.json"


@dataclass
class StageOutput:
    """What a stage hands back: its artifact directory, its figures, whether the cache served it, and
    the training step its figures belong to (eval figures are logged at the evaluated step)."""
    path: Path
    figures: dict
    reused: bool = False
    step: int = 0


class StageFailed(RuntimeError):
    """A stage raised: names the stage; earlier stages' artifacts are kept."""

    def __init__(self, stage: str, cause: BaseException, log: Path):
        super().__init__(f"stage `{stage}` failed: {type(cause).__name__}: {cause} (traceback: {log}; "
                         f"artifacts of earlier stages are kept)")
        self.stage = stage


class RunStopped(RuntimeError):
    """Training stopped on request (SIGTERM) after writing a checkpoint; later stages did not run."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"run stopped on request at step {step} after a checkpoint; continue it with "
                         f"`pretrain resume {run_dir}`")


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


@contextmanager
def ray_connection(config: Config):
    """Use the Ray this process is connected to; else attach to `cluster.address`; else start an
    embedded Ray with enough CPUs for the training workers (stopped again on exit)."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    runtime_env = {"worker_process_setup_hook": "pipeline.orchestrate.quiet_ray_workers", "env_vars": {
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        # Ray Train's print patch tees a worker's print to stdout *and* the root logger: every line twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    c = config.cluster
    if c.address:
        ray.init(address=c.address, log_to_driver=True, runtime_env=runtime_env)
    else:
        needed = int(math.ceil(max(c.num_workers * c.cpus_per_worker, config.data.num_workers)))
        # A short temp root: Ray's unix socket paths must stay under 107 characters.
        temp_root = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "pretrain-ray"
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False,
                 _temp_dir=str(temp_root), configure_logging=False, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()


def quiet_ray_workers() -> None:
    """Runs in every Ray worker process, so this module must not import torch: imported before Ray
    sets the worker's OMP_NUM_THREADS, torch would keep more intra-op threads than torchrun gives a
    rank, and float sums would no longer match torchrun's bit for bit. Ray Train's placement-group cleaner asks the State API every
    second whether the controller lives; without the dashboard (the minimal `ray` install, and an
    embedded Ray here) every ask fails and warns, burying the training log. The cleaner only matters
    when the controller dies, and then Ray frees the placement group with the job anyway."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def run_pipeline(config: Config, *, only: str | None = None, from_stage: str | None = None,
                 until: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """Run the selected stages in order; returns {stage: figures}. Raises StageFailed naming the stage."""
    stages = select_stages(only, from_stage, until)
    config = absolute_paths(config)
    run_dir = prepare_run_dir(config)
    state = RunState.load(run_dir)
    with ray_connection(config):
        return _run_stages(config, stages, run_dir, state, echo)


def _run_stages(config: Config, stages: list[str], run_dir: Path, state: RunState, echo) -> dict:
    from pipeline.tracking import environment_tags, open_tracker

    tracker = open_tracker(config, run_dir, rank=0)
    tracker.log_params(config.model_dump(mode="json"))
    tracker.set_tags(environment_tags(config))
    tracker.log_artifact(run_dir / "config.yaml")
    echo(f"run {config.run.name}: {run_dir} (stages: {', '.join(stages)})")
    results = {}
    try:
        with checkpoint_requests_outside_training(echo):
            for stage in stages:
                results[stage] = _run_stage(stage, config, run_dir, state, tracker, echo)
                if results[stage].get("stopped_on_request"):
                    raise RunStopped(run_dir, results[stage]["steps"])
    except RunStopped:
        tracker.finish("KILLED")
        raise
    except StageFailed:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return results


@contextmanager
def checkpoint_requests_outside_training(echo: Callable[[str], None]):
    """SIGUSR1 asks training for a checkpoint (Slurm sends it before the time limit); in the other
    stages there is nothing to save, and its default action would kill the pipeline: say so, go on.
    The train stage installs its own handler while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: echo(
        "SIGUSR1 outside training: no checkpoint to write, continuing"))
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _run_stage(stage: str, config: Config, run_dir: Path, state: RunState, tracker, echo) -> dict:
    from pipeline.tracking import log_stage

    started = time.perf_counter()
    state.record(stage, "running")
    tracker.set_tags({f"stage.{stage}": "running"})
    try:
        output = STAGE_RUNNERS[stage](config, run_dir, state, tracker)
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
    status = "stopped" if output.figures.get("stopped_on_request") else "done"
    state.record(stage, status, path=str(output.path), reused=output.reused, figures=output.figures,
                 seconds=seconds)
    log_stage(tracker, stage, output.figures, status, step=output.step)
    echo(f"{stage}: {'reused ' if output.reused else ''}{output.path} ({seconds} s)")
    return output.figures


def _tokenizer(config: Config, run_dir: Path, state: RunState, tracker):
    import ray

    from pipeline.tokenizer import tokenizer_stage

    result = ray.get(ray.remote(num_cpus=1)(tokenizer_stage).remote(config))
    tracker.log_artifact(result.path / "tokenizer.json", "tokenizer")
    return StageOutput(result.path, result.manifest.get("figures", {}), result.reused)


def _shard(config: Config, run_dir: Path, state: RunState, tracker):
    from pipeline.shard import shard_stage

    result = shard_stage(config)
    return StageOutput(result.path, result.manifest.get("figures", {}), result.reused)


def _train(config: Config, run_dir: Path, state: RunState, tracker):
    from pipeline.checkpoint import checkpoints_dir
    from pipeline.train import DEEPSPEED_CONFIG_FILE, run_training

    shard_dir = state.output("shard")
    figures = run_training(config, shard_dir, run_dir)
    tracker.log_artifact(run_dir / DEEPSPEED_CONFIG_FILE)
    tracker.log_artifact(write_checkpoint_manifest(run_dir), "checkpoints")
    return StageOutput(checkpoints_dir(run_dir), figures, step=int(figures["steps"]))


def write_checkpoint_manifest(run_dir: Path) -> Path:
    """`checkpoints/manifest.json`: every complete checkpoint's step, tokens seen, world size and files
    with their sizes, and which one `latest` names (the weights stay out of MLflow: they can be large)."""
    from pipeline.checkpoint import COMPLETE, checkpoints_dir, latest_tag, read_trainer_state

    root = checkpoints_dir(run_dir)
    entries = []
    for path in sorted(root.glob("step-*")):
        if not (path / COMPLETE).is_file():
            continue
        trainer = read_trainer_state(path)
        files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
        entries.append({"tag": path.name, "step": trainer["step"], "tokens_seen": trainer["tokens_seen"],
                        "world_size": trainer["world_size"], "bytes": sum(files.values()), "files": files})
    manifest = root / "manifest.json"
    atomic_write_json(manifest, {"latest": latest_tag(run_dir), "checkpoints": entries})
    return manifest


def _eval(config: Config, run_dir: Path, state: RunState, tracker):
    import ray

    from pipeline.evaluate import evaluate_run

    remote = ray.remote(num_cpus=1, num_gpus=1 if config.cluster.use_gpu else 0)(evaluate_run)
    report = ray.get(remote.remote(config, run_dir, state.output("shard"), state.output("tokenizer")))
    return log_eval_artifacts(tracker, run_dir, report)


def log_eval_artifacts(tracker, run_dir: Path, report: dict) -> StageOutput:
    """Attach the report, the summary and a fresh loss curve to the run; the metrics go at the
    evaluated checkpoint's step so they line up with the training curves."""
    from pipeline.tracking import loss_curve_png

    for name in ("report.json", "summary.txt"):
        tracker.log_artifact(run_dir / "eval" / name, "eval")
    curve = loss_curve_png(run_dir / "metrics.jsonl", run_dir / "eval" / "loss_curve.png")
    if curve is not None:
        tracker.log_artifact(curve, "eval")
    return StageOutput(run_dir / "eval", report["metrics"], step=int(report["step"]))


def evaluate_existing_run(run_dir: Path, checkpoint_tag: str | None = None, **lm_eval) -> dict:
    """`pretrain eval RUN_DIR`: evaluate in this process and log to the run's own MLflow run."""
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_run
    from pipeline.tracking import log_stage, open_tracker

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml); give the directory "
                          f"`pretrain run` printed, e.g. <workdir>/runs/<name>")
    config = load_config(run_dir / "config.yaml")
    state = RunState.load(run_dir)
    report = evaluate_run(config, run_dir, state.output("shard"), state.output("tokenizer"),
                          checkpoint_tag=checkpoint_tag, **lm_eval)
    tracker = open_tracker(config, run_dir, rank=0)
    output = log_eval_artifacts(tracker, run_dir, report)
    log_stage(tracker, "eval", output.figures, "done", step=output.step)
    tracker.finish("FINISHED")  # open_tracker marked the reopened run RUNNING
    return report


STAGE_RUNNERS = {"tokenizer": _tokenizer, "shard": _shard, "train": _train, "eval": _eval}
