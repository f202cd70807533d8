"""The PNGs attached to runs (a loss curve, a sweep's final losses, a scaling-law fit): matplotlib is
imported here only, never on a training rank."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.tracking.journal import read_metrics
from pipeline.tracking.names import METRIC_TRAIN_LOSS, METRIC_VAL_LOSS


def loss_curve_png(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Plot train and val loss against step; None (and no file) when there is no loss yet."""
    curves: dict[str, dict[int, float]] = {METRIC_TRAIN_LOSS: {}, METRIC_VAL_LOSS: {}}
    for record in read_metrics(metrics_jsonl):
        for name, points in curves.items():
            if name in record["metrics"]:
                points[record["step"]] = record["metrics"][name]  # a resumed run's redone step wins
    if not any(curves.values()):
        return None
    figure = Figure(figsize=(7, 4), layout="tight")
    axes = figure.add_subplot()
    for (name, points), style in zip(curves.items(), ("-", "o-")):
        if points:
            steps = sorted(points)
            axes.plot(steps, [points[s] for s in steps], style, label=name, markersize=3)
    axes.set(xlabel="step", ylabel="loss", title=Path(metrics_jsonl).parent.name)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out_png)


def _save(figure: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_png)
    return out_png


def _numbers(values: list) -> list[float] | None:
    try:
        return [float(value) for value in values]
    except (TypeError, ValueError):
        return None


def sweep_loss_png(rows: list[dict], keys: list[str], out_png: str | Path) -> Path | None:
    """A sweep's final validation loss against each swept key (one panel per key, a point per trial,
    coloured by status); None when no trial has a loss yet."""
    rows = [row for row in rows if row["val_loss"] is not None]
    if not rows or not keys:
        return None
    figure = Figure(figsize=(4.5 * len(keys), 4), layout="tight")
    for index, key in enumerate(keys):
        axes = figure.add_subplot(1, len(keys), index + 1)
        labels = [row[key] for row in rows]
        x = _numbers(labels)
        if x is None:  # categorical values: one position each, in order of appearance
            categories = list(dict.fromkeys(labels))
            x = [categories.index(label) for label in labels]
            axes.set_xticks(range(len(categories)), categories, rotation=30)
        elif min(x) > 0 and max(x) >= 10 * min(x):
            axes.set_xscale("log")
        for status, marker in (("done", "o"), ("stopped", "x")):
            points = [(xi, row["val_loss"]) for xi, row in zip(x, rows) if row["status"] == status]
            if points:
                axes.plot(*zip(*points), marker, label=status)
        axes.set(xlabel=key, ylabel="final val loss")
        axes.grid(alpha=0.3)
        axes.legend()
    return _save(figure, out_png)


def scaling_fit_png(params, tokens, losses, law, out_png: str | Path) -> Path:
    """The trials' final losses against tokens, one colour per model size, with the fitted law's curves
    (`law(n, d)` gives the fitted loss)."""
    import numpy as np

    figure = Figure(figsize=(7, 4.5), layout="tight")
    axes = figure.add_subplot()
    d_grid = np.logspace(np.log10(min(tokens)) - 0.3, np.log10(max(tokens)) + 0.3, 100)
    for n in sorted(set(params)):
        points = sorted((d, loss) for p, d, loss in zip(params, tokens, losses) if p == n)
        line = axes.plot(*zip(*points), "o", label=f"N={n:,}")[0]
        axes.plot(d_grid, law(n, d_grid), "-", color=line.get_color(), alpha=0.6)
    axes.set(xscale="log", xlabel="tokens D", ylabel="final val loss", title="L(N, D) = E + A/N^a + B/D^b")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out_png)
