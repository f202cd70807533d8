"""Per-rank memory of ZeRO stages 0-3 with 2 CPU ranks (gloo) on a ~60M-parameter GPT.

For each stage and setting a fresh `torchrun --nproc_per_node 2` trains 3 steps (micro-batch 2 x
seq_len 64) and each rank reports
- model-state bytes: the storage of every parameter, gradient and optimizer tensor the rank holds,
  measured after the last backward (gradients present) and before the step, deduplicated by storage:
  module parameters (ZeRO-3: the rank's partitions), their .grad, the optimizer's state (exp_avg,
  exp_avg_sq) and DeepSpeed's own buffers (fp32 master partitions, gradient partitions, buckets);
- peak RSS (ru_maxrss) of the whole process after the steps, and the same above the RSS the process
  had before building the model (Python, torch, DeepSpeed, gloo: about 0.4 GiB, the same for every stage).
Settings:
- `default`: fp32, DeepSpeed's default bucket sizes, the model built whole on every rank before
  deepspeed.initialize (how NOTES-infra measured "no saving");
- `sized`: fp32, the pipeline's own config (buckets sized for the model; ZeRO-3 under zero.Init, which
  also installs DeepSpeed's memory-efficient linear), as pipeline.training runs;
- `sized_malloc`: `sized` with MALLOC_MMAP_THRESHOLD_=131072, so glibc returns freed transient buffers
  to the OS instead of keeping them resident (costs ~30% CPU throughput; a diagnosis, not a default);
- `sized_bf16`: `sized` in bf16 mixed precision, the case `pretrain plan`'s ZeRO arithmetic describes.
Stage 0 has no buckets and no zero.Init: its `sized` run serves `default`. Goals: model states
stage 3 <= 0.55 x stage 0, peak RSS stage 3 <= 0.75 x stage 0. Prints one JSON line.

    .venv/bin/python bench/zero_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loader import VOCAB, synthetic_shards  # noqa: E402  (bench/loader.py)

from pipeline.config import load_config  # noqa: E402

MODEL = [
    "model.d_model=768",
    "model.n_layers=8",
    "model.n_heads=12",
    "model.max_seq_len=64",
    f"tokenizer.vocab_size={VOCAB}",
    "train.micro_batch_size=2",
    "train.grad_accum_steps=1",
    "train.max_steps=3",
    "train.warmup_steps=1",
    "cluster.num_workers=2",
    "tracking.enabled=false",
]
DEEPSPEED_DEFAULT_BUCKETS = (
    "train.deepspeed={zero_optimization: {reduce_bucket_size: 500000000, "
    "allgather_bucket_size: 500000000, stage3_prefetch_bucket_size: 50000000, "
    "stage3_max_live_parameters: 1000000000, stage3_max_reuse_distance: 1000000000, "
    "stage3_param_persistence_threshold: 100000}}"
)
GIB = 1024**3
SETTINGS = {  # name -> (config overrides, build under zero.Init (pipeline.training.engine.create_model), environment)
    "default": ([DEEPSPEED_DEFAULT_BUCKETS], False, {}),
    "sized": ([], True, {}),
    "sized_malloc": ([], True, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    "sized_bf16": (["train.precision=bf16"], True, {}),
}


# ---------------------------------------------------------------------------------------------
# One rank (under torchrun)


def held_bytes(engine) -> dict[str, int]:
    """Bytes of distinct tensor storages by category, first category wins (see the module docstring)."""
    seen: set[int] = set()
    held = {"params": 0, "grads": 0, "optimizer_state": 0, "deepspeed_buffers": 0}

    def count(category: str, tensor) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                held[category] += storage.nbytes()

    params = list(engine.module.parameters())
    for p in params:
        count("params", getattr(p, "ds_tensor", p.data))
    for p in params:
        count("grads", p.grad)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        for tensor in state.values():
            count("optimizer_state", tensor)
    for tensor in _tensors(vars(engine.optimizer), depth=4):
        count("deepspeed_buffers", tensor)
    return held


def _tensors(value, depth: int):
    if isinstance(value, torch.Tensor):
        yield value
    elif depth and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth - 1)
    elif depth and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth - 1)


def worker(args) -> None:
    import torch.distributed as dist

    from pipeline.data.loader import TokenDataset
    from pipeline.training import engine
    from pipeline.training.ds_config import deepspeed_config
    from pipeline.training.loop import make_loader
    from pipeline.training.modeling import build_model

    engine.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    overrides, zero_init, _ = SETTINGS[args.setting]
    if args.stage == 0:
        overrides = [o for o in overrides if o != DEEPSPEED_DEFAULT_BUCKETS]
    config = load_config(None, [*MODEL, f"train.zero_stage={args.stage}", *overrides])
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(config).parameters())
    ds_config = deepspeed_config(config.train, world, num_parameters=n_params, d_model=config.model.d_model)
    model = engine.create_model(config, ds_config) if zero_init else build_model(config)
    model_engine = engine.initialize(model, config.train, ds_config)
    loader = make_loader(TokenDataset(args.shards), config, rank, world)
    for step in range(config.train.max_steps):
        model_engine.backward(model_engine(**loader.next_batch()).loss)
        if step == config.train.max_steps - 1:
            held = held_bytes(model_engine)
        engine.optimizer_step(model_engine)
    result = {
        "rank": rank,
        "held": held,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline_rss": baseline_rss,
        "model_params": n_params,
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    dist.destroy_process_group()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# Driver


def measure(stage: int, setting: str, shards: Path, tmp: Path) -> list[dict]:
    out = tmp / f"stage{stage}-{setting}"
    out.mkdir()
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        __file__,
        "--worker",
        "--stage",
        str(stage),
        "--setting",
        setting,
        "--shards",
        str(shards),
        "--out",
        str(out),
    ]
    env = {**os.environ, "TMPDIR": str(tmp), **SETTINGS[setting][2]}
    done = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"stage {stage} ({setting}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]


def summary(ranks: list[dict]) -> dict:
    """The worst rank's figures (GiB), and every rank's."""

    def gib(value):
        return round(value / GIB, 4)

    return {
        "model_params": ranks[0]["model_params"],
        "model_states_gib": gib(max(sum(r["held"].values()) for r in ranks)),
        "peak_rss_gib": gib(max(r["peak_rss"] for r in ranks)),
        "peak_rss_above_baseline_gib": gib(max(r["peak_rss"] - r["baseline_rss"] for r in ranks)),
        "per_rank": [{k: gib(v) for k, v in r["held"].items()} | {"peak_rss": gib(r["peak_rss"])} for r in ranks],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int)
    parser.add_argument("--setting", choices=list(SETTINGS))
    parser.add_argument("--shards")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="bench-zero-") as tmp:
        shards = synthetic_shards(Path(tmp) / "shards", 2_000_000)
        results: dict[str, dict[int, dict]] = {setting: {} for setting in SETTINGS}
        for setting in SETTINGS:
            for stage in range(4):
                if setting == "default" and stage == 0:
                    continue
                results[setting][stage] = summary(measure(stage, setting, shards, Path(tmp)))
        results["default"][0] = results["sized"][0]
    figures = ("model_states_gib", "peak_rss_gib", "peak_rss_above_baseline_gib")
    ratios = {
        setting: {
            f"stage{s}_vs_0": {f.removesuffix("_gib"): round(by_stage[s][f] / by_stage[0][f], 3) for f in figures}
            for s in (1, 2, 3)
        }
        for setting, by_stage in results.items()
    }
    print(
        json.dumps(
            {
                "bench": "zero_memory",
                "model_params": results["sized"][0]["model_params"],
                "ranks": 2,
                "goals": {"model_states_stage3_vs_0": "<= 0.55", "peak_rss_stage3_vs_0": "<= 0.75"},
                "ratios": ratios,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
