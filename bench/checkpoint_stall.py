"""Checkpoint stall, synchronous against asynchronous (train.async_checkpoint), one JSON line.

A model of at least 100M parameters (gpt2-124m's blocks, 15 layers, on a 512-token vocabulary: 106M),
fp32, ZeRO 1, --ranks CPU ranks of one thread each under torchrun, micro-batch 1 x 128 tokens, a
checkpoint every 5 steps (the last one, at the end, is synchronous either way).

A step's time is the wall time between consecutive `train/loss` records of the journal
(train.log_every=1); a checkpoint written after step N shows in step N+1's time. The stall of a
checkpoint is that time minus the median of the steps with no checkpoint around them; the figure is
the median over the run's periodic checkpoints, each way, alternating sync and async runs over
--rounds. Goal: async stall <= 20% of the sync stall. Also reported: the step after that one
(`while_writing_s`). With 2 ranks on 2 cores the background writer competes with the ranks for CPU;
`--ranks 1` leaves a core to it, as a GPU node's host cores are.

    .venv/bin/python bench/checkpoint_stall.py [--rounds 2] [--steps 21] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import dump_config, load_config  # noqa: E402
from pipeline.data.shard import shard_stage  # noqa: E402
from pipeline.tracking.journal import read_metrics  # noqa: E402
from pipeline.training.plan import make_plan  # noqa: E402

EVERY = 5
MODEL = [
    "model.family=gpt",
    "model.n_layers=15",
    "model.d_model=768",
    "model.n_heads=12",
    "train.seq_len=128",
    "train.micro_batch_size=1",
    "train.grad_accum_steps=1",
    "train.warmup_steps=2",
    "train.zero_stage=1",
    "train.precision=fp32",
    "train.log_every=1",
    "train.eval_every=0",
    f"train.checkpoint_every={EVERY}",
    "train.keep_checkpoints=1",
]
DATA = [
    "data.max_documents=120",
    "data.val_permille=100",
    "data.num_workers=1",
    "tokenizer.vocab_size=512",
    "tokenizer.sample_bytes=1000000",
]


def step_times(run_dir: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r["metrics"]]
    return {b["step"]: (b["time_ms"] - a["time_ms"]) / 1000 for a, b in zip(records, records[1:])}


def train(workdir: Path, shards: Path, steps: int, asynchronous: bool, index: int, ranks: int) -> dict:
    run_dir = workdir / f"run-{index}-{'async' if asynchronous else 'sync'}"
    run_dir.mkdir(parents=True)
    overrides = [*DATA, *MODEL, f"cluster.num_workers={ranks}", f"train.max_steps={steps}"]
    overrides.append(f"train.async_checkpoint={str(asynchronous).lower()}")
    (run_dir / "config.yaml").write_text(dump_config(load_config(None, overrides)))
    env = {**os.environ, "TMPDIR": str(workdir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command += ["-m", "pipeline.training", "--run-dir", str(run_dir), "--shards", str(shards)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    times = step_times(run_dir)
    after = [step + 1 for step in range(EVERY, steps, EVERY) if step + 1 in times and step < steps]
    around = {s for step in after for s in (step, step + 1, step + 2)}
    quiet = statistics.median(t for s, t in times.items() if s not in around and s > 2)
    return {
        "stall_s": statistics.median(times[s] - quiet for s in after),
        "step_s": quiet,
        "while_writing_s": statistics.median(times[s + 1] for s in after if s + 1 in times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument(
        "--ranks", type=int, default=2, help="CPU ranks, one thread each (1: a core left for the writer)"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    config = load_config(None, [f"run.workdir={workdir}", *DATA, *MODEL])
    shards = shard_stage(config).path
    results = {"sync": [], "async": []}
    for index in range(args.rounds):
        for asynchronous in (False, True):
            way = "async" if asynchronous else "sync"
            results[way].append(train(workdir, shards, args.steps, asynchronous, index, args.ranks))
    figures = {
        way: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
        for way, runs in results.items()
    }
    figures["stall_ratio"] = round(figures["async"]["stall_s"] / figures["sync"]["stall_s"], 3)
    figures["params"] = make_plan(config)["params"]
    figures["rounds"], figures["ranks"] = args.rounds, args.ranks
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
