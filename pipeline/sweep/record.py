"""A sweep's directory, its trial record and its MLflow run (the parent of every trial's run).

    <workdir>/sweeps/<name>/
        sweep.json          the varying axes, samples and seed, and per trial: overrides, status, error
        trials.json         the table of trials (MLflow table artifact): values, final losses, tokens, status
        final_loss.png      final validation loss against each swept key
        scaling_fit.json    with --fit scaling: the fitted law, the compute-optimal N and D for the budget
        scaling_fit.png     the trials' losses with the fitted curves
        tune/               Ray Tune's experiment directory
        logs/, metrics.jsonl, mlflow_*   the sweep driver's log and the journal of its MLflow run

A trial's own run is an ordinary run directory, `<workdir>/runs/<trial name>/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, config_changes, load_config
from pipeline.errors import ConfigError, SweepError
from pipeline.run.artifacts import atomic_write_json
from pipeline.run.rundir import CONFIG_FILE, EVAL_DIR, METRICS_FILE, REPORT_FILE, run_dir_of
from pipeline.sweep.space import Trial
from pipeline.tracking.journal import last_metric
from pipeline.tracking.names import METRIC_TOKENS_SEEN, METRIC_VAL_LOSS

SWEEP_FILE = "sweep.json"
TRIALS_FILE = "trials.json"
LOSS_PLOT_FILE = "final_loss.png"
FIT_FILE = "scaling_fit.json"
FIT_PLOT_FILE = "scaling_fit.png"
TUNE_DIR = "tune"
FINISHED = ("done", "stopped")  # a rerun skips these (when the trial's config is unchanged)


def sweep_dir_of(config: Config) -> Path:
    return Path(config.run.workdir).resolve() / "sweeps" / config.run.name


@dataclass
class SweepRecord:
    """sweep.json: what identifies the sweep (`identity`) and each trial's state."""

    path: Path
    identity: dict
    trials: dict[str, dict]

    @classmethod
    def open(cls, sweep_dir: Path, identity: dict, trials: list[Trial]) -> SweepRecord:
        """Start the record, or continue the one of an earlier attempt with the same axes."""
        path = sweep_dir / SWEEP_FILE
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if saved is not None and saved["identity"] != identity:
            raise SweepError(
                f"{path}: this sweep was started with {json.dumps(saved['identity'])}, not "
                f"{json.dumps(identity)}; rerun it with the same axes, --samples and --seed, or name a new "
                "sweep with run.name=NAME"
            )
        states = saved["trials"] if saved else {}
        record = cls(path, identity, {t.name: states.get(t.name, {"status": "pending"}) for t in trials})
        for trial in trials:
            record.trials[trial.name]["overrides"] = list(trial.overrides)
        record.save()
        return record

    def save(self) -> None:
        atomic_write_json(self.path, {"identity": self.identity, "trials": self.trials})

    def set_status(self, name: str, status: str, error: str | None = None) -> None:
        self.trials[name].update(status=status, error=error)
        self.save()

    def finished(self, name: str, config: Config) -> bool:
        """Whether a trial finished with this very config (a changed fixed override, say a longer
        train.max_steps, runs it again: it resumes from its latest checkpoint)."""
        if self.trials[name]["status"] not in FINISHED:
            return False
        saved = run_dir_of(config) / CONFIG_FILE
        try:
            return not config_changes(load_config(saved).model_dump(mode="json"), config)
        except ConfigError:
            return False


def trial_row(trial: Trial, status: str, config: Config, params: int, swept: list[str]) -> dict:
    """One row of the trials table: the swept values, then what the trial's run directory holds."""
    run_dir = run_dir_of(config)
    values = dict(item.split("=", 1) for item in trial.overrides)
    report_path = run_dir / EVAL_DIR / REPORT_FILE
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    metrics = report.get("metrics", {})
    last_val = last_metric(run_dir / METRICS_FILE, METRIC_VAL_LOSS)
    tokens = last_metric(run_dir / METRICS_FILE, METRIC_TOKENS_SEEN)
    return {
        "trial": trial.name,
        "status": status,
        **{key: values[key] for key in swept},
        "val_loss": metrics.get("val_loss", last_val[1] if last_val else None),
        "bits_per_byte": metrics.get("bits_per_byte"),
        "tokens": int(tokens[1]) if tokens else None,
        "step": report.get("step", last_val[0] if last_val else None),
        "params": params,
    }


def trials_table(rows: list[dict]) -> dict:
    """The rows in MLflow's table-artifact format."""
    columns = list(rows[0]) if rows else []
    return {"columns": columns, "data": [[row[column] for column in columns] for row in rows]}


def best_row(rows: list[dict]) -> dict | None:
    """The finished trial with the lowest final validation loss."""
    done = [row for row in rows if row["status"] == "done" and row["val_loss"] is not None]
    return min(done, key=lambda row: row["val_loss"]) if done else None
