"""Saving and restoring a rank's training state: engine, loader position, RNG streams and counters.

Layout and the `latest` pointer: pipeline/rundir.py; writing, retention and storage checks:
pipeline/checkpoint.py. With the same world size every later loss equals the uninterrupted run's bit
for bit (fp32). The world size may change: the data position is mapped by global samples consumed
(the loader's state); ZeRO 1-3 partitions of another world size load through DeepSpeed's universal
format, converted by rank 0 next to the checkpoint and deleted after (`ds_to_universal`: seconds for
small models, a full copy of the model states on disk for large ones). Ranks that did not exist when
the checkpoint was saved start from the seeded RNG state.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pipeline import checkpoint
from pipeline import engine as ds_engine
from pipeline.tracking.journal import mlflow_run_id
from pipeline.training.run import Run


def save_checkpoint(run: Run) -> None:
    """Every rank calls this (DeepSpeed writes each rank's shard; a rank that skipped would hang the rest)."""
    run.last_checkpoint = checkpoint.save(
        run.run_dir,
        run.step,
        rank=run.rank,
        barrier=dist.barrier,
        keep=run.config.train.keep_checkpoints,
        save_engine=lambda root, tag: ds_engine.save_checkpoint(run.engine, root, tag),
        trainer_state={
            "step": run.step,
            "tokens_seen": run.tokens_seen,
            "loader": run.loader.state_dict(),
            "world_size": run.world_size,
            "mlflow_run_id": mlflow_run_id(run.run_dir),
            **run.health.state_dict(),
            "config_fingerprint": checkpoint.fingerprint(run.config),
            "config": run.config.model_dump(mode="json"),
        },
    )


def resume(run: Run, point: tuple[Path, dict, dict] | None) -> None:
    """Load the checkpoint `checkpoint.resume_point` found (engine, loader, RNG, counters) and print
    the config changes it allowed."""
    if point is None:
        return
    path, state, changes = point
    load_state(run, path, state, restore_loader=True)
    run.resumed_from = run.step
    run.health.load_state_dict(state)
    if run.rank == 0:
        print(f"resumed from {path} (step {run.step}, {run.tokens_seen:,} tokens)", flush=True)
        for key, (old, new) in changes.items():
            print(f"resume: {key} changed from {old!r} to {new!r}", flush=True)
        run.sink.set_tags({"train.resumed_from_step": run.step})


def load_state(run: Run, path: Path, state: dict[str, Any], *, restore_loader: bool) -> None:
    """Engine, RNG, step and tokens (and the loader's position if asked) from the checkpoint at path,
    after checking its files hold nothing but data."""
    ds_engine.verify_checkpoint(path)
    reshard = state["world_size"] != run.world_size and run.config.train.zero_stage > 0
    load_dir = path.parent / "universal" if reshard else path.parent
    if reshard and run.rank == 0:
        shutil.rmtree(load_dir, ignore_errors=True)  # debris of an interrupted conversion
        ds_engine.convert_to_universal(path, load_dir / path.name)
    dist.barrier()
    ds_engine.load_checkpoint(run.engine, load_dir, path.name)
    dist.barrier()
    if reshard and run.rank == 0:
        shutil.rmtree(load_dir)
    if restore_loader:
        run.loader.load_state_dict(state["loader"])
    checkpoint.load_rng_state(path, run.rank)
    run.step, run.tokens_seen, run.last_checkpoint = state["step"], state["tokens_seen"], path
