"""Throughput of the train stage versus a bare PyTorch loop: same model, batch, data, AdamW, one process.

Both loops train the same GPT (d_model 256, 4 layers, seq_len 128, micro-batch 8: about 4M parameters)
from the same seed on the same synthetic shards, in fp32 on the CPU, in one process:
- stage: pipeline.training.loop's `setup` + `train` (DeepSpeed ZeRO 0 engine, the loader, metrics every 10
  steps, the per-step checkpoint-request all-reduce); `ratio` uses the tokens/s the stage reports (it
  leaves out evaluation and checkpoints), `ratio_wall_with_checkpoint` the wall clock of whole rounds,
  each ending with the checkpoint the stage always writes at its last step;
- bare: loader.next_batch -> forward -> backward -> clip_grad_norm_ -> AdamW (the same weight-decay
  groups) -> LR schedule -> zero_grad.
They alternate in rounds of --steps steps (the first round of each is warm-up and dropped), so machine
noise hits both alike; figures are medians over rounds, `ratio` the median of the rounds' paired
stage/bare ratios (`ratio_of_medians` beside it). One JSON line; goal: ratio >= 0.95.

    .venv/bin/python bench/train_overhead.py [--rounds 5] [--steps 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loader import VOCAB, synthetic_shards  # noqa: E402  (bench/loader.py)

from pipeline.config import dump_config, load_config  # noqa: E402
from pipeline.data.loader import TokenDataset  # noqa: E402
from pipeline.training.engine import param_groups  # noqa: E402
from pipeline.training.loop import make_loader, setup, train  # noqa: E402
from pipeline.training.modeling import build_model  # noqa: E402
from pipeline.training.schedule import lr_multiplier  # noqa: E402

MODEL = [
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.max_seq_len=128",
    f"tokenizer.vocab_size={VOCAB}",
    "train.micro_batch_size=8",
    "train.grad_accum_steps=1",
    "train.warmup_steps=10",
    "train.zero_stage=0",
    "train.precision=fp32",
    "train.log_every=10",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "cluster.num_workers=1",
    "tracking.enabled=false",
    # The bare loop attends causally over whole windows; so does the stage here (the cost of document
    # masking itself is bench/masking.py's figure, not the stage's overhead).
    "train.document_masking=false",
]


def bare_loop(config, shard_dir: Path):
    """A generator: each next() trains `steps` more steps and yields tokens/s."""
    t = config.train
    model = build_model(config)
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, t),
    )
    loader = make_loader(TokenDataset(shard_dir), config, rank=0, world_size=1)
    steps = yield
    while True:
        started = time.perf_counter()
        for _ in range(steps):
            for _ in range(t.grad_accum_steps):
                loss = model(**loader.next_batch()).loss / t.grad_accum_steps
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        steps = yield steps * t.global_batch_size * t.seq_len / (time.perf_counter() - started)


def stage_loop(config, shard_dir: Path, run_dir: Path):
    """The same, through the train stage's own loop; yields (the tokens/s it reports, wall-clock
    tokens/s of the whole round, which includes the checkpoint the stage always writes at the end)."""
    run, callbacks = setup(config, run_dir, shard_dir, driver_verified=False)
    steps = yield
    while True:
        run.config.train.max_steps = run.step + steps
        started, meter = time.perf_counter(), run.meter
        steps_before, seconds_before = meter.total_steps, meter.total_seconds
        train(run, callbacks)
        reported = (meter.total_steps - steps_before) * run.tokens_per_step / (meter.total_seconds - seconds_before)
        wall = steps * run.tokens_per_step / (time.perf_counter() - started)
        steps = yield reported, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        shard_dir = synthetic_shards(Path(tmp) / "shards", 4_000_000)
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        total_steps = 10_000  # the LR schedule's horizon; both loops stop long before
        config = load_config(None, [*MODEL, f"train.max_steps={total_steps}", f"run.workdir={tmp}"])
        (run_dir / "config.yaml").write_text(dump_config(config))
        loops = {"bare": bare_loop(config, shard_dir), "stage": stage_loop(config, shard_dir, run_dir)}
        rates: dict[str, list[float]] = {"bare": [], "stage": [], "stage_wall": []}
        with contextlib.redirect_stdout(sys.stderr):  # the stage's progress lines; stdout is the JSON line
            for loop in loops.values():
                next(loop)
            for _ in range(args.rounds + 1):
                rates["bare"].append(loops["bare"].send(args.steps))
                reported, wall = loops["stage"].send(args.steps)
                rates["stage"].append(reported)
                rates["stage_wall"].append(wall)
    bare, stage, wall = (statistics.median(rates[name][1:]) for name in ("bare", "stage", "stage_wall"))
    # Each round's stage run follows its bare run within seconds: their ratio cancels the machine's
    # slower drifts, which the ratio of the two medians keeps.
    paired = [s / b for s, b in zip(rates["stage"][1:], rates["bare"][1:])]
    print(
        json.dumps(
            {
                "bench": "train_overhead",
                "model_params": sum(p.numel() for p in build_model(config).parameters()),
                "tokens_per_step": config.train.global_batch_size * config.train.seq_len,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "torch_threads": torch.get_num_threads(),
                "bare_tokens_per_s": round(bare, 1),
                "stage_tokens_per_s": round(stage, 1),
                "ratio": round(statistics.median(paired), 4),
                "goal": ">= 0.95",
                "ratio_of_medians": round(stage / bare, 4),
                "stage_wall_tokens_per_s": round(wall, 1),
                "ratio_wall_with_checkpoint": round(wall / bare, 4),
                "rounds_tokens_per_s": {name: [round(r, 1) for r in values] for name, values in rates.items()},
            }
        )
    )
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown with a live process group (see pipeline.training.torchrun.main)


if __name__ == "__main__":
    main()
