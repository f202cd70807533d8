"""Trials as Ray Tune trials. Each trial is one `run_pipeline` of its config (tokenizer and shards from
the cache, train, in-loop validation, eval) in a Tune trial actor on the sweep's Ray cluster, so a trial
is an ordinary run: its own run directory, its own MLflow run, resumable. While it trains, the trial
reports each in-loop validation loss to Tune (for ASHA) from its run's journal, and at the end the eval
stage's loss. A trial that ASHA stops checkpoints and stops like a run sent SIGTERM.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Callable
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from pipeline.config import Config
from pipeline.errors import SweepError, UserError
from pipeline.run.rundir import EVAL_DIR, LOGS_DIR, METRICS_FILE, REPORT_FILE, RunState, run_dir_of
from pipeline.run.runtime import remote_cause
from pipeline.sweep.record import TUNE_DIR
from pipeline.tracking.journal import jsonl_records
from pipeline.tracking.names import METRIC_VAL_LOSS

REPORT_INTERVAL_S = 1.0
TRIAL_LOG = "trial.log"
TRIAL_CPUS = 1  # the trial actor (the run's driver); its training workers reserve their own


def asha_scheduler(configs: dict[str, Config]):
    """ASHA over training steps: rungs at train.eval_every x 2^k below the longest trial's max_steps
    (max_t one step beyond it: ASHA stops a trial that reaches max_t, which would cut off its eval)."""
    cadence = {config.train.eval_every for config in configs.values()}
    if 0 in cadence:
        raise SweepError(
            "--early-stop asha compares the trials' in-loop validation losses, and train.eval_every=0 turns "
            "them off; set train.eval_every=N (e.g. a tenth of train.max_steps)"
        )
    max_t = max(config.train.max_steps for config in configs.values())
    return ASHAScheduler(time_attr="step", max_t=max_t + 1, grace_period=min(cadence), reduction_factor=2)


def run_trials(
    configs: dict[str, Config],
    sweep_dir: Path,
    *,
    max_concurrent: int,
    early_stop: str | None,
    echo: Callable[[str], None],
) -> dict[str, tuple[str, str | None]]:
    """Run the trials on the connected Ray; {name: (status, error)}, status "done", "stopped" or "failed".
    A failing trial is recorded and the others go on."""
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(PipelineTrial, configs=configs), {"cpu": TRIAL_CPUS}),
        param_space={"trial": tune.grid_search(list(configs))},
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            max_concurrent_trials=max_concurrent,
            scheduler=asha_scheduler(configs) if early_stop == "asha" else None,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(sweep_dir),
            verbose=0,
            callbacks=[_Progress(len(configs), echo)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            # The checkpoints are the runs' own (DeepSpeed's, in each run directory), not Tune's.
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0),
        ),
    )
    outcomes = {}
    for result in tuner.fit():
        name = result.config["trial"]
        if result.error is not None:
            outcomes[name] = ("failed", _one_line(result.error))
        else:  # the run's own record: a stop that came as its eval ran still finished the run
            evaluated = RunState.load(run_dir_of(configs[name])).stages.get("eval", {}).get("status") == "done"
            outcomes[name] = ("done" if evaluated else "stopped", None)
    return outcomes


def _one_line(error: BaseException) -> str:
    cause = remote_cause(error)
    while cause.__cause__ is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    text = str(cause) if isinstance(cause, UserError) else f"{type(cause).__name__}: {cause}"
    return text.splitlines()[0] if text else type(cause).__name__


class PipelineTrial(tune.Trainable):
    """One trial in its Tune actor: the whole pipeline of its config in a thread; each `step` returns
    the next in-loop validation loss from the run's journal, and the last one the eval stage's loss.
    When the scheduler stops the trial, the actor asks training for a checkpoint and a clean stop and
    waits for it, so the trial's worker group ends and its run can be resumed. Tune reuses the actor
    for the next trial (`reset_config`): its imports stay warm."""

    def setup(self, params: dict, configs: dict[str, Config]) -> None:
        self.configs, self.pipeline = configs, None
        self._start(params)

    def reset_config(self, new_config: dict) -> bool:
        self._stop_pipeline()
        self._start(new_config)
        return True

    def _start(self, params: dict) -> None:
        self.run_config = self.configs[params["trial"]]
        self.run_dir = run_dir_of(self.run_config)
        self.validation = _ValidationFollower(self.run_dir / METRICS_FILE)
        self.error: BaseException | None = None
        self.pipeline = threading.Thread(target=self._run_pipeline, name="pipeline", daemon=True)
        self.pipeline.start()

    def _run_pipeline(self) -> None:
        from pipeline.run.orchestrate import run_pipeline

        try:
            run_pipeline(self.run_config, echo=_trial_log(self.run_dir))
        except BaseException as exc:  # handed to step()
            self.error = exc

    def step(self) -> dict:
        while True:
            result = self.validation.next()
            if result is not None:
                return result
            if not self.pipeline.is_alive():
                return self._final_result()
            self.pipeline.join(REPORT_INTERVAL_S)

    def _final_result(self) -> dict:
        if self.error is not None:
            raise self.error
        report = json.loads((self.run_dir / EVAL_DIR / REPORT_FILE).read_text(encoding="utf-8"))
        return {"val_loss": report["metrics"]["val_loss"], "step": int(report["step"]), "finished": True, "done": True}

    def cleanup(self) -> None:
        self._stop_pipeline()

    def _stop_pipeline(self) -> None:
        """A trial the scheduler stopped is still training: a checkpoint, a clean stop, then its end."""
        if self.pipeline is not None and self.pipeline.is_alive():
            from pipeline.training.requests import write_request

            write_request(self.run_dir, stop=True)
            self.pipeline.join()


class _ValidationFollower:
    """The new `val/loss` values of the run's journal, in order."""

    def __init__(self, metrics: Path):
        self.metrics, self.offset = metrics, 0

    def next(self) -> dict | None:
        for end, record in jsonl_records(self.metrics, self.offset):
            self.offset = end
            if METRIC_VAL_LOSS in record["metrics"]:
                return {"val_loss": record["metrics"][METRIC_VAL_LOSS], "step": int(record["step"])}
        return None


def _trial_log(run_dir: Path) -> Callable[[str], None]:
    """What `pretrain run` would print, kept in the trial's `logs/trial.log` (the sweep prints one line per
    trial event)."""

    def echo(line: str) -> None:
        path = run_dir / LOGS_DIR / TRIAL_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {line}\n")

    return echo


class _Progress(tune.Callback):
    """One console line when a trial starts, finishes, stops early or fails."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.echo, self.started = total, echo, 0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started += 1
        self.echo(f"trial {self.started}/{self.total} {trial.config['trial']}: started")

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("finished")
        self.echo(f"trial {trial.config['trial']}: {'finished' if done else 'stop requested by ASHA'}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.echo(f"trial {trial.config['trial']}: failed")
