"""Tokens/s and MFU of the train stage for gpt2-124m in bf16 on the local GPUs.

configs/gpt2-124m.yaml (12 layers, d_model 768, seq_len 1024, vocab 50304, bf16, ZeRO-1) on synthetic
token shards, micro-batch --micro-batch per GPU, no gradient accumulation, run by
`torchrun --nproc_per_node <GPUs> -m pipeline.training` for --steps steps with metrics every 10 steps.
MFU is the stage's own figure: 6N + 12 L d T FLOPs per token (models.flops_per_token) over the GPU's
dense bf16 peak from pipeline.training.meter.GPU_PEAK_FLOPS. Figures are medians over the logged windows after
the first (warm-up). Without CUDA it prints a `skipped` line, unless overrides are given (a CPU smoke
run of the same path, e.g. `train.precision=fp32 model.n_layers=2`). One JSON line.

    .venv/bin/python bench/gpu_train.py [--steps 60] [--micro-batch 16] [--gpus N] [KEY=VALUE ...]
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from loader import synthetic_shards  # noqa: E402  (bench/loader.py)

from pipeline.config import dump_config, load_config  # noqa: E402
from pipeline.tracking.journal import read_metrics  # noqa: E402


def run(args, tmp: Path) -> dict:
    config = load_config(
        REPO / "configs" / "gpt2-124m.yaml",
        [
            f"cluster.num_workers={args.gpus}",
            f"train.micro_batch_size={args.micro_batch}",
            "train.grad_accum_steps=1",
            "train.global_batch_size=null",
            "train.max_tokens=null",
            f"train.max_steps={args.steps}",
            "train.warmup_steps=5",
            "train.log_every=10",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "tracking.enabled=false",
            "data.verify_checksums=false",
            *args.overrides,
        ],
    )
    t = config.train
    shards = synthetic_shards(tmp / "shards", (args.steps + 5) * t.global_batch_size * (t.seq_len + 1))
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(config))
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        str(args.gpus),
        "-m",
        "pipeline.training",
        "--run-dir",
        str(run_dir),
        "--shards",
        str(shards),
    ]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    windows = [r["metrics"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/tokens_per_s" in r["metrics"]][
        1:
    ]

    def median(name):
        values = [w[name] for w in windows if name in w]
        return statistics.median(values) if values else None

    tokens_per_s = median("train/tokens_per_s")
    return {
        "bench": "gpu_train",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": args.gpus,
        "model": "gpt2-124m",
        "precision": t.precision,
        "zero_stage": t.zero_stage,
        "micro_batch": t.micro_batch_size,
        "seq_len": t.seq_len,
        "steps": args.steps,
        "windows": len(windows),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / args.gpus if tokens_per_s else None,
        "mfu": median("train/mfu"),
        "step_time_s": median("train/step_time_s"),
        "memory_peak_gib": median("train/memory_peak_gib"),
        "overrides": args.overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.compile=true")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.overrides:
        print(json.dumps({"bench": "gpu_train", "skipped": "no CUDA device"}))
        return
    args.gpus = max(args.gpus, 1)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        print(json.dumps(run(args, Path(tmp))))


if __name__ == "__main__":
    main()
