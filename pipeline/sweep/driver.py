"""`pretrain sweep`: many runs of one config as Ray Tune trials under one MLflow run.

The driver validates every trial's config before anything starts, builds the tokenizer and shards once on
the sweep's Ray (every trial then takes them from the cache), runs the trials that have not finished with
their current config (pipeline/sweep/trials.py), and records on the sweep's MLflow run the trials table,
the best trial, a plot of the final loss against each swept key and, with --fit scaling, the scaling law.
Rerunning the same command continues the sweep: finished trials are skipped, the others resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, SweepError
from pipeline.run.guard import run_lock, writable_run_dir
from pipeline.run.rundir import LOGS_DIR, absolute_paths, run_dir_of
from pipeline.sweep.record import SweepRecord, sweep_dir_of
from pipeline.sweep.space import Axis, Trial, parse_axes, sweep_trials

EARLY_STOPPING = ("asha",)
FITS = ("scaling",)


@dataclass(frozen=True)
class SweepOptions:
    samples: int = 1
    max_concurrent: int = 1
    early_stop: str | None = None
    fit: str | None = None
    budget_flops: float | None = None
    seed: int = 0


@dataclass
class SweepPlan:
    """The validated sweep: its base config, varying axes, trials and each trial's config."""

    base: Config
    axes: list[Axis]
    trials: list[Trial]
    configs: dict[str, Config]

    @property
    def swept_keys(self) -> list[str]:
        return [axis.key for axis in self.axes]


def plan_sweep(config_path: str | None, axis_texts: list[str], options: SweepOptions) -> SweepPlan:
    """Parse the axes and validate every trial's config; nothing is written. A single-valued axis is a
    plain override shared by every trial (it may change between attempts: say, a longer max_steps)."""
    axes = parse_axes(axis_texts)
    fixed = [text for axis, text in zip(axes, axis_texts) if axis.distribution is None and len(axis.values) == 1]
    varying = [axis for axis in axes if axis.distribution is not None or len(axis.values) > 1]
    if not varying:
        raise SweepError(
            "a sweep needs an axis with several values, e.g. train.lr=1e-3,3e-4 or train.lr=loguniform:1e-4:1e-2"
        )
    base = absolute_paths(load_config(config_path, fixed))
    trials = sweep_trials(base.run.name, varying, options.samples, options.seed)
    configs = {}
    for trial in trials:
        overrides = [*fixed, *trial.overrides, f"run.name={json.dumps(trial.name)}"]
        try:
            configs[trial.name] = absolute_paths(load_config(config_path, overrides))
        except ConfigError as exc:
            raise SweepError(f"trial {trial.name} ({' '.join(trial.overrides)}): {exc}") from None
    _check_options(options, configs)
    return SweepPlan(base, varying, trials, configs)


def _check_options(options: SweepOptions, configs: dict[str, Config]) -> None:
    if options.early_stop not in (None, *EARLY_STOPPING):
        raise SweepError(f"--early-stop {options.early_stop}: the schedulers are {', '.join(EARLY_STOPPING)}")
    if options.fit not in (None, *FITS):
        raise SweepError(f"--fit {options.fit}: the fits are {', '.join(FITS)}")
    if options.budget_flops is not None and options.fit != "scaling":
        raise SweepError("--budget-flops is the compute budget of the scaling-law fit; give --fit scaling with it")
    if options.max_concurrent < 1 or options.samples < 1:
        raise SweepError("--max-concurrent and --samples must be at least 1")
    if options.early_stop:
        from pipeline.sweep.trials import asha_scheduler

        asha_scheduler(configs)  # refuses a sweep without in-loop validation, before anything runs


def run_sweep(plan: SweepPlan, options: SweepOptions, echo: Callable[[str], None] = print) -> list[dict]:
    """Run (or continue) the planned sweep; returns the trials table's rows. Raises SweepError after the
    summary when a trial failed."""
    from pipeline.run.runtime import ray_connection
    from pipeline.sweep.summary import open_sweep_run, summarize
    from pipeline.sweep.trials import TRIAL_CPUS, run_trials

    sweep_dir = writable_run_dir(sweep_dir_of(plan.base))
    axes = [f"{axis.key}={axis.values_text}" for axis in plan.axes]
    identity = {"axes": axes, "samples": options.samples, "seed": options.seed}
    with run_lock(sweep_dir):
        record = SweepRecord.open(sweep_dir, identity, plan.trials)
        settings = {"samples": options.samples, "seed": options.seed, "early_stop": options.early_stop}
        tracker = open_sweep_run(plan.base, plan.axes, len(plan.trials), sweep_dir, settings)
        plan.configs = {name: with_parent(config, tracker.run_id) for name, config in plan.configs.items()}
        echo(f"sweep {plan.base.run.name}: {len(plan.trials)} trials, {sweep_dir}")
        status = "FAILED"
        try:
            pending = _pending(plan, record, echo)
            workers = max(c.cluster.num_workers * c.cluster.cpus_per_worker for c in plan.configs.values())
            with ray_connection(plan.base, min_cpus=int(options.max_concurrent * (workers + TRIAL_CPUS))):
                build_data(plan, echo)
                outcomes = run_trials(
                    pending,
                    sweep_dir,
                    max_concurrent=options.max_concurrent,
                    early_stop=options.early_stop,
                    echo=echo,
                )
            for name, (trial_status, error) in outcomes.items():
                record.set_status(name, trial_status, error)
                if trial_status == "stopped":
                    close_stopped_trial(plan.configs[name])
            rows = summarize(plan, record, tracker, sweep_dir, options, echo)
            status = "FINISHED"
        finally:
            tracker.finish(status)
    failed = {name: state["error"] for name, state in record.trials.items() if state["status"] == "failed"}
    if failed:
        listed = "; ".join(f"{name}: {error}" for name, error in failed.items())
        raise SweepError(
            f"{len(failed)} of {len(plan.trials)} trials failed ({listed}); their tracebacks are in "
            f"<workdir>/runs/<trial>/{LOGS_DIR}/. Rerun the same command to retry them: finished trials are skipped"
        )
    return rows


def with_parent(config: Config, parent_run_id: str | None) -> Config:
    config = config.model_copy(deep=True)
    if parent_run_id is not None:
        config.tracking.parent_run_id = parent_run_id
    return config


def _pending(plan: SweepPlan, record: SweepRecord, echo: Callable[[str], None]) -> dict[str, Config]:
    pending = {}
    for name, config in plan.configs.items():
        if record.finished(name, config):
            echo(f"trial {name}: {record.trials[name]['status']} in an earlier attempt, skipped")
        else:
            pending[name] = config
    return pending


def build_data(plan: SweepPlan, echo: Callable[[str], None]) -> None:
    """The tokenizer and shards of every distinct data setting, built (or found in the cache) once,
    before any trial starts."""
    from pipeline.data.shard import shard_stage
    from pipeline.data.tokenizer import tokenizer_stage

    seen = set()
    for config in plan.configs.values():
        sections = [config.data.model_dump(mode="json"), config.tokenizer.model_dump(mode="json")]
        key = json.dumps([*sections, config.model.family])
        if key in seen:
            continue
        seen.add(key)
        tokenizer = tokenizer_stage(config)
        shards = shard_stage(config, tokenizer)
        echo(f"data: tokenizer {tokenizer.path}{' (reused)' if tokenizer.reused else ''}")
        echo(f"data: shards {shards.path}{' (reused)' if shards.reused else ''}")


def close_stopped_trial(config: Config) -> None:
    """Tag the MLflow run of a trial ASHA stopped (the trial checkpointed and stopped, its run KILLED):
    `sweep.trial_status=stopped` tells it from a run a user stopped."""
    from pipeline.tracking.store import open_tracker

    tracker = open_tracker(config, run_dir_of(config))
    tracker.set_tags({"sweep.trial_status": "stopped"})
    tracker.finish("KILLED")
