"""Sweep overhead and scaling-fit recovery, one JSON line.

Overhead: the wall time of `pretrain sweep CONFIG train.lr=A,B,C,D --max-concurrent 1` (4 trials of
--steps-step gpt-tiny runs on 2 CPU workers) over the sum of the same 4 runs launched one by one with
`pretrain run`, caches warm (the tokenizer and shards are built first), alternating sweep and runs per
round; medians over --rounds. Goal: <= 0.8.

Recovery: L(N, D) fitted to a 7 x 7 ladder (1e7..1e10 parameters x 1e9..1e12 tokens) of losses from
Chinchilla's published law with 0.5% multiplicative noise, over --seeds draws: the largest error of each
parameter and of the compute-optimal N at 1e21 FLOPs.

    .venv/bin/python bench/sweep.py [--rounds 1] [--steps 50] [--seeds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRESET = str(REPO / "configs" / "gpt-tiny.yaml")
LRS = ["1e-3", "2e-3", "3e-3", "4e-3"]


def pretrain(*args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pretrain {args[0]} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started


def overhead(rounds: int, steps: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    common = [f"run.workdir={workdir}", f"train.max_steps={steps}", "train.checkpoint_every=0"]
    pretrain("shard", PRESET, *common)  # warm caches: the tokenizer and the shards
    sweeps, sums = [], []
    for round_index in range(rounds):
        sweeps.append(pretrain("sweep", PRESET, *common, f"run.name=sweep{round_index}", f"train.lr={','.join(LRS)}"))
        sums.append(
            sum(pretrain("run", PRESET, *common, f"run.name=run{round_index}-{lr}", f"train.lr={lr}") for lr in LRS)
        )
    ratios = [s / r for s, r in zip(sweeps, sums)]
    return {
        "trials": len(LRS),
        "steps": steps,
        "sweep_s": round(statistics.median(sweeps), 1),
        "runs_sum_s": round(statistics.median(sums), 1),
        "overhead_ratio": round(statistics.median(ratios), 3),
        "rounds": rounds,
    }


def recovery(seeds: int) -> dict:
    from pipeline.sweep.scaling import ScalingFit, fit_scaling_law

    true = ScalingFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0, points=0)
    n, d = (grid.ravel() for grid in np.meshgrid(np.logspace(7, 10, 7), np.logspace(9, 12, 7)))
    errors: dict[str, list[float]] = {"alpha": [], "beta": [], "E_rel": [], "optimal_n_rel": []}
    started = time.perf_counter()
    for seed in range(seeds):
        losses = true.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, 0.005, n.size))
        fit = fit_scaling_law(n, d, losses)
        errors["alpha"].append(abs(fit.alpha - true.alpha))
        errors["beta"].append(abs(fit.beta - true.beta))
        errors["E_rel"].append(abs(fit.E / true.E - 1))
        errors["optimal_n_rel"].append(abs(fit.compute_optimal(1e21)[0] / true.compute_optimal(1e21)[0] - 1))
    seconds = (time.perf_counter() - started) / seeds
    return {f"max_err_{key}": round(max(values), 4) for key, values in errors.items()} | {
        "fit_seconds": round(seconds, 2),
        "seeds": seeds,
        "noise": 0.005,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--skip-overhead", action="store_true", help="the fit's recovery only")
    args = parser.parse_args()
    figures = {"recovery": recovery(args.seeds)}
    if not args.skip_overhead:
        figures["overhead"] = overhead(args.rounds, args.steps)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
