"""The loss-curve PNG attached to a run: matplotlib is imported here only, never on a training rank."""

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
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_png)
    return out_png
