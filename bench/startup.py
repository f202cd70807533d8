"""Start-up: seconds from launching a command to the end of its first optimizer step, and to its exit, for a
1-step gpt-tiny run with warm caches on 2 CPU workers, three ways side by side, alternating in rounds:

- `pretrain train CONFIG train.max_steps=1` (Ray started by the command, a Ray Train worker group, DeepSpeed);
- `torchrun --nproc_per_node 2 -m pipeline.training` on the same shards (no Ray, no MLflow);
- nanoGPT's `train.py` (one process, the same model shape and batch, --compile=False, its first
  evaluation cut to one batch), with --nanogpt pointing at a nanoGPT checkout; the shards' tokens are
  written to its data directory as train.bin / val.bin;
- the floor of the Ray Train path: a Python process that starts Ray as `pretrain train` does
  (`ray_connection`) and runs a `TorchTrainer` of the same 2 workers whose training function only
  prints a line: how long Ray and Ray Train alone take before any of the project's per-rank code runs.

The first step ends when its line appears on the command's output (`step 1/1 | loss` for ours, `iter 0:`
for nanoGPT). The `pretrain train` rounds also report when each console line appeared, the phases a
user sees: command start to the run line (imports, config, lock, tracking), to the tokenizer line (Ray
started), to the train line (cached stages), to the first step, to the exit. Medians over --rounds.
Prints one JSON line.

    .venv/bin/python bench/startup.py [--rounds 3] [--nanogpt DIR] [--tracking]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "gpt-tiny.yaml"
ONE_STEP = ["train.max_steps=1", "train.warmup_steps=0"]
FLOOR_MARK = "floor: worker group done"
MARKS = {"run": "run ", "ray_up": "tokenizer:", "train_stage": "train: DeepSpeed", "first_step": "step 1/1 | loss"}


def timed(command: list[str], first_step_mark: str, cwd: Path, env: dict | None = None) -> dict[str, float]:
    """Seconds from start to the first line holding each mark, and to exit."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    seen: dict[str, float] = {}
    marks = {**MARKS, "first_step": first_step_mark}
    lines = []
    for line in process.stdout:
        lines.append(line)
        for name, mark in marks.items():
            if name not in seen and mark in line:
                seen[name] = time.perf_counter() - started
    process.wait()
    if process.returncode != 0 or "first_step" not in seen:
        raise RuntimeError(f"{command[:3]} failed:\n{''.join(lines[-30:])}")
    return seen | {"exit": time.perf_counter() - started}


def ray_train_floor() -> None:
    """The floor (see the module docstring): Ray started as the train stage starts it, then a worker
    group of gloo ranks whose function only prints `FIRST_STEP_MARK`."""
    from pipeline.config import load_config
    from pipeline.run.runtime import ray_connection

    config = load_config(PRESET)
    print("run ", flush=True)
    with ray_connection(config), tempfile.TemporaryDirectory() as storage:
        print("tokenizer: Ray is up", flush=True)
        from ray.train import RunConfig, ScalingConfig  # imported once Ray is up, as the train stage does
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer = TorchTrainer(
            _reached,
            scaling_config=ScalingConfig(num_workers=config.cluster.num_workers, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="floor", storage_path=storage),
        )
        trainer.fit()
        print(FLOOR_MARK, flush=True)


def _reached() -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(os.environ["STARTUP_FLOOR_FILE"]).write_text(str(time.time()))


def timed_floor() -> dict[str, float]:
    """The floor's marks, its function's start taken from the file rank 0 writes (workers' prints stay
    in Ray's logs)."""
    with tempfile.TemporaryDirectory() as scratch:
        reached = Path(scratch) / "reached"
        env = {**os.environ, "STARTUP_FLOOR_FILE": str(reached)}
        started_wall = time.time()
        seen = timed([sys.executable, __file__, "--ray-train-floor"], FLOOR_MARK, REPO, env)
        return seen | {"first_step": float(reached.read_text()) - started_wall}


def nanogpt_data(shard_dir: Path, nanogpt: Path) -> str:
    """The shards' tokens as nanoGPT's uint16 train.bin / val.bin; returns the dataset's name."""
    index = json.loads((shard_dir / "index.json").read_text())
    name = "pretrain_startup"
    out = nanogpt / "data" / name
    out.mkdir(parents=True, exist_ok=True)
    for split, target in (("train", "train.bin"), ("val", "val.bin")):
        arrays = [np.fromfile(shard_dir / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
        np.concatenate(arrays).astype(np.uint16).tofile(out / target)
    return name


def nanogpt_command(nanogpt: Path, dataset: str, out_dir: Path) -> list[str]:
    from pipeline.config import load_config

    config = load_config(PRESET)
    m, t = config.model, config.train
    flags = {
        "dataset": dataset, "out_dir": str(out_dir), "device": "cpu", "compile": False, "dtype": "float32",
        "n_layer": m.n_layers, "n_head": m.n_heads, "n_embd": m.d_model, "block_size": t.seq_len,
        "batch_size": t.micro_batch_size * config.cluster.num_workers, "gradient_accumulation_steps": 1,
        "max_iters": 1, "eval_iters": 1, "eval_interval": 1000, "log_interval": 1, "always_save_checkpoint": False,
        "dropout": 0.0, "bias": True, "learning_rate": t.lr, "warmup_iters": 0, "wandb_log": False,
    }  # fmt: skip
    return [sys.executable, "train.py", *(f"--{key}={value}" for key, value in flags.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (train.py, model.py)")
    parser.add_argument("--tracking", action="store_true", help="track the pretrain runs in MLflow (sqlite)")
    parser.add_argument("--ray-train-floor", action="store_true", help=argparse.SUPPRESS)  # the floor's process
    args = parser.parse_args()
    if args.ray_train_floor:
        ray_train_floor()
        return
    workdir = Path(tempfile.mkdtemp(prefix="startup-"))
    pretrain = [sys.executable, "-m", "launch.cli", "train", str(PRESET), f"run.workdir={workdir}", *ONE_STEP]
    tracking = [] if args.tracking else ["tracking.enabled=false"]
    timed([*pretrain, "run.name=warm", *tracking], MARKS["first_step"], REPO)  # builds the caches
    shard_dir = next((workdir / "cache" / "shard").glob("[!.]*"))
    dataset = nanogpt_data(shard_dir, args.nanogpt) if args.nanogpt else None
    results: dict[str, list[dict]] = {"pretrain_train": [], "ray_train_floor": [], "torchrun": [], "nanogpt": []}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    for round_ in range(args.rounds):
        results["pretrain_train"].append(
            timed([*pretrain, f"run.name=r{round_}", *tracking], MARKS["first_step"], REPO)
        )
        results["ray_train_floor"].append(timed_floor())
        run_dir = workdir / "runs" / f"t{round_}"
        run_dir.mkdir(parents=True)
        shutil.copy(workdir / "runs" / "warm" / "config.yaml", run_dir / "config.yaml")
        command = [torchrun, "--nproc_per_node", "2", "-m", "pipeline.training", "--run-dir", str(run_dir)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        results["torchrun"].append(timed([*command, "--shards", str(shard_dir)], MARKS["first_step"], REPO, env))
        if dataset:
            out_dir = workdir / "nanogpt-out"
            results["nanogpt"].append(timed(nanogpt_command(args.nanogpt, dataset, out_dir), "iter 0:", args.nanogpt))
    summary = {
        way: {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}
        for way, rounds in results.items()
        if rounds
    }
    load = os.getloadavg()[0]
    print(json.dumps({"rounds": args.rounds, "tracking": args.tracking, "seconds": summary, "load_avg_1m": load}))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
