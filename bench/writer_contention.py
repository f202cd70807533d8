"""How much a background checkpoint write slows the training thread beside it, one JSON line.

A training-like step on one thread (matmuls of a 1024-wide 8-layer stack, then an Adam-like update
streaming 800 MB) runs alone, and beside a loop that writes 1.6 GB of tensors as the asynchronous
checkpoint writer does (torch.save without CRC32, fsync, sha256), three ways: `torch.save` to a path
in a thread (the writer before), `torch.save` into an open file in a thread (the writer now,
pipeline/training/async_checkpoint.py), and into an open file in a forked process (no shared GIL).
Rounds alternate; figures are medians, as slowdowns over the step alone. One core is left to the
writer (the case of a GPU node's host).

    .venv/bin/python bench/writer_contention.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from pipeline.training.async_checkpoint import skip_zip_crc32

WAYS = ("alone", "thread_to_path", "thread_to_open_file", "process_to_open_file")


class Step:
    """Forward-like matmuls, then an optimizer-like update over 800 MB (memory-bound, as Adam is)."""

    def __init__(self) -> None:
        self.weights = [torch.randn(1024, 1024) for _ in range(8)]
        self.inputs = torch.randn(512, 1024)
        self.moment, self.grad = torch.randn(100_000_000), torch.randn(100_000_000)

    def seconds(self, repeats: int = 3) -> float:
        started = time.perf_counter()
        for _ in range(repeats):
            for _ in range(20):
                hidden = self.inputs
                for weight in self.weights:
                    hidden = torch.tanh(hidden @ weight)
            self.moment.mul_(0.9).add_(self.grad, alpha=0.1)
        return time.perf_counter() - started


def write_checkpoints(stop, writing, path: str, to_open_file: bool) -> None:
    """Write, fsync and hash 1.6 GB of tensors until `stop` is set; `writing` is set once it writes."""
    skip_zip_crc32()
    state = {f"tensor{i}": torch.full((100_000_000,), 0.5) for i in range(4)}
    writing.set()
    while not stop.is_set():
        if to_open_file:
            with open(path, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
        else:
            torch.save(state, path)
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)


def timed_beside(step: Step, way: str, path: str) -> float:
    if way == "alone":
        return step.seconds()
    if way == "process_to_open_file":
        context = multiprocessing.get_context("fork")
        stop, writing = context.Event(), context.Event()
        writer = context.Process(target=write_checkpoints, args=(stop, writing, path, True))
    else:
        stop, writing = threading.Event(), threading.Event()
        to_open_file = way == "thread_to_open_file"
        writer = threading.Thread(target=write_checkpoints, args=(stop, writing, path, to_open_file))
    writer.start()
    writing.wait()
    seconds = step.seconds()
    stop.set()
    writer.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    step = Step()
    step.seconds(1)  # warm-up
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as scratch:
        path = str(Path(scratch) / "checkpoint.pt")
        for _ in range(args.rounds):
            for way in WAYS:
                times[way].append(timed_beside(step, way, path))
    medians = {way: statistics.median(values) for way, values in times.items()}
    slowdown = {way: round(medians[way] / medians["alone"], 3) for way in WAYS[1:]}
    step_s = {way: round(value, 2) for way, value in medians.items()}
    print(json.dumps({"step_s": step_s, "slowdown": slowdown, "load_avg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
