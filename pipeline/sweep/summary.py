"""The sweep's MLflow run: created before the trials (they name it as their parent), and, after them,
the trials table, the best trial, the final loss against each swept key and the scaling-law fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config
from pipeline.run.artifacts import atomic_write_json
from pipeline.run.rundir import run_dir_of
from pipeline.sweep.record import (
    FIT_FILE,
    FIT_PLOT_FILE,
    LOSS_PLOT_FILE,
    TRIALS_FILE,
    SweepRecord,
    best_row,
    trial_row,
    trials_table,
)
from pipeline.sweep.scaling import fit_scaling_law
from pipeline.sweep.space import Axis
from pipeline.tracking.journal import mlflow_run_id


def open_sweep_run(base: Config, axes: list[Axis], trials: int, sweep_dir: Path, options: dict):
    """The sweep's MLflow run (reopened on a rerun), named after the base config's run: the base config,
    the axes and the sweep's options as params. Its run_id is set once this returns (logging created
    the run; None with tracking off or unreachable): the trials name it as their parent."""
    from pipeline.tracking.store import open_tracker

    tracker = open_tracker(base, sweep_dir)
    tracker.log_params(base.model_dump(mode="json"))
    swept = {axis.key: axis.values_text for axis in axes}
    tracker.log_params({"sweep": {"axes": swept, **options}})
    tracker.set_tags({"sweep.trials": str(trials)})
    return tracker


def summarize(plan, record: SweepRecord, tracker, sweep_dir: Path, options, echo: Callable[[str], None]) -> list[dict]:
    from pipeline.tracking.plot import sweep_loss_png
    from pipeline.training.plan import make_plan

    rows = [
        trial_row(
            trial,
            record.trials[trial.name]["status"],
            plan.configs[trial.name],
            make_plan(plan.configs[trial.name])["non_embedding_params"],
            plan.swept_keys,
        )
        for trial in plan.trials
    ]
    atomic_write_json(sweep_dir / TRIALS_FILE, trials_table(rows))
    tracker.log_artifact(sweep_dir / TRIALS_FILE)
    plot = sweep_loss_png(rows, plan.swept_keys, sweep_dir / LOSS_PLOT_FILE)
    if plot is not None:
        tracker.log_artifact(plot)
    for line in format_rows(rows, plan.swept_keys):
        echo(line)
    best = best_row(rows)
    if best is not None:
        best_run = mlflow_run_id(run_dir_of(plan.configs[best["trial"]])) or ""
        tracker.set_tags({"sweep.best_trial": best["trial"], "sweep.best_run_id": best_run})
        scores = {"best/val_loss": best["val_loss"], "best/bits_per_byte": best["bits_per_byte"]}
        tracker.log_metrics({key: value for key, value in scores.items() if value is not None}, 0)
        echo(f"best trial: {best['trial']} (val loss {best['val_loss']:.4f})")
    if options.fit == "scaling":
        fit_scaling(rows, tracker, sweep_dir, options.budget_flops, echo)
    return rows


def format_rows(rows: list[dict], keys: list[str]) -> list[str]:
    """The trials table for the console."""
    header = ["trial", *keys, "status", "val loss", "bits/byte", "tokens"]
    lines = [
        [
            row["trial"],
            *(str(row[key]) for key in keys),
            row["status"],
            _number(row["val_loss"]),
            _number(row["bits_per_byte"]),
            f"{row['tokens']:,}" if row["tokens"] else "-",
        ]
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *lines]
    ]


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def fit_scaling(rows: list[dict], tracker, sweep_dir: Path, budget_flops: float | None, echo) -> None:
    """Fit L(N, D) to the finished trials (N: non-embedding parameters, D: tokens trained) and record the
    law, its plot and the compute-optimal N and D for the budget."""
    from pipeline.tracking.plot import scaling_fit_png

    done = [row for row in rows if row["status"] == "done" and row["val_loss"] is not None and row["tokens"]]
    params, tokens, losses = ([row[key] for row in done] for key in ("params", "tokens", "val_loss"))
    fit = fit_scaling_law(params, tokens, losses)
    result = {"law": "L(N, D) = E + A / N^alpha + B / D^beta", "fit": fit.as_dict(), "budget_flops": budget_flops}
    law = f"L = {fit.E:.3f} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}"
    echo(f"scaling law ({fit.points} trials): {law}")
    metrics = {f"fit/{key}": getattr(fit, key) for key in ("E", "A", "B", "alpha", "beta")}
    if budget_flops is not None:
        n_opt, d_opt = fit.compute_optimal(budget_flops)
        result |= {"optimal_params": n_opt, "optimal_tokens": d_opt}
        metrics |= {"fit/optimal_params": n_opt, "fit/optimal_tokens": d_opt}
        echo(f"compute-optimal for {budget_flops:.3g} FLOPs: N = {n_opt:,.0f} parameters, D = {d_opt:,.0f} tokens")
    atomic_write_json(sweep_dir / FIT_FILE, result)
    tracker.log_artifact(sweep_dir / FIT_FILE)
    tracker.log_artifact(scaling_fit_png(params, tokens, losses, fit.loss, sweep_dir / FIT_PLOT_FILE))
    tracker.log_metrics(metrics, 0)
