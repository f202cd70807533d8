"""Training progress on the driver's console, read from the run's journal while the workers train.

Ray workers' own output stays in the Ray session logs, so the driver is the one that tells the user
how training goes: a progress bar over optimizer steps on a terminal, or one line per logged window
when the output is a file (a Slurm log, CI), with the loss, validation loss and throughput.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from pipeline.run.rundir import METRICS_FILE
from pipeline.tracking.journal import following, jsonl_records
from pipeline.tracking.names import (
    METRIC_ROLLBACKS,
    METRIC_TOKENS_PER_S,
    METRIC_TRAIN_LOSS,
    METRIC_VAL_LOSS,
)

# A step's line reaches the console at most this late (1 s made a 1-step run's first line 0.5 s later
# on average); a poll reads only the journal's new bytes.
POLL_S = 0.25


def describe(record: dict) -> str:
    """`loss 5.47 | val 5.49 | 4.7e+04 tokens/s` for the metrics one journal record holds."""
    metrics, parts = record["metrics"], []
    if METRIC_TRAIN_LOSS in metrics:
        parts.append(f"loss {metrics[METRIC_TRAIN_LOSS]:.4g}")
    if METRIC_VAL_LOSS in metrics:
        parts.append(f"val loss {metrics[METRIC_VAL_LOSS]:.4g}")
    if METRIC_TOKENS_PER_S in metrics:
        parts.append(f"{metrics[METRIC_TOKENS_PER_S]:,.0f} tokens/s")
    if metrics.get(METRIC_ROLLBACKS):
        parts.append(f"rolled back to the latest checkpoint ({metrics[METRIC_ROLLBACKS]:.0f} so far)")
    return " | ".join(parts)


@contextmanager
def training_progress(run_dir: Path, max_steps: int, echo: Callable[[str], None] = print) -> Iterator[None]:
    """While the block runs, follow `<run_dir>/metrics.jsonl` from its current end and show each new
    record: a bar when stdout is a terminal, else one line per record."""
    path = Path(run_dir) / METRICS_FILE
    offset = path.stat().st_size if path.is_file() else 0
    bar = tqdm(total=max_steps, unit="step", desc="train", dynamic_ncols=True) if sys.stdout.isatty() else None

    def show_new_records() -> None:
        nonlocal offset
        for end, record in jsonl_records(path, offset):
            offset = end
            text = describe(record)
            if not text:
                continue
            if bar is None:
                echo(f"step {record['step']}/{max_steps} | {text}")
            else:
                bar.update(record["step"] - bar.n)
                bar.set_postfix_str(text, refresh=True)

    try:
        with following(show_new_records, POLL_S, name="training-progress"):
            yield
    finally:
        if bar is not None:
            bar.close()
