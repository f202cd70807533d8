"""The training loop of one rank: `setup`, `train`, `train_step`, `evaluate`.

It only needs torch.distributed to be set up (Ray Train does it; under torchrun `init_distributed`
does), so the same code runs in a Ray Train worker group (pipeline/training/ray_train.py) and under
torchrun (pipeline/training/torchrun.py). The periodic concerns (rollback, metrics, validation, checkpoints,
profiling) live in pipeline/training/callbacks.py and decide their own cadence; the loop body only
steps and hands each step to them.

Resume. Starting a run whose directory holds a complete checkpoint resumes it
(pipeline/training/checkpoint.py).
Config changes are checked against the checkpoint: the model, tokenizer, data, seed, seq_len, ZeRO
stage, precision and offload are refused, anything else (max_steps, cadences, learning rate, ...) is
allowed and printed. The global batch follows a new world size unless train.global_batch_size pins it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models import flops_per_token, num_parameters
from pipeline.config import Config, load_config
from pipeline.data.loader import BatchLoader, TokenDataset, check_vocab_fits
from pipeline.data.shards import SHARD_TOKENIZER_DIR, verify_shards
from pipeline.data.tokenizer import bert_masking_ids
from pipeline.errors import ConfigError
from pipeline.run.artifacts import atomic_write_json
from pipeline.run.rundir import CONFIG_FILE, DEEPSPEED_CONFIG_FILE
from pipeline.tracking.journal import training_sink
from pipeline.training import checkpoint, engine, storage
from pipeline.training.callbacks import default_callbacks
from pipeline.training.checkpoint import resume
from pipeline.training.ds_config import deepspeed_config
from pipeline.training.health import StepHealth, step_was_bad
from pipeline.training.meter import Meter, compilation_figures, peak_flops_per_device
from pipeline.training.modeling import build_model, model_config
from pipeline.training.plan import checkpoint_bytes
from pipeline.training.run import Callback, Run, StepOutcome, TrainResult


def train_worker(run_dir: Path, shard_dir: Path, *, driver_verified: bool = False) -> TrainResult:
    """One rank's whole training, from the run directory's config.yaml."""
    run_dir, shard_dir = Path(run_dir), Path(shard_dir)
    run, callbacks = setup(load_config(run_dir / CONFIG_FILE), run_dir, shard_dir, driver_verified=driver_verified)
    try:
        return train(run, callbacks)
    finally:
        run.sink.close()


def setup(config: Config, run_dir: Path, shard_dir: Path, *, driver_verified: bool) -> tuple[Run, list[Callback]]:
    """Process group, data check, resume checks, data, model, DeepSpeed engine; then load `latest` if any.
    `driver_verified`: the driver already checked the shards; otherwise rank 0 does, the others wait."""
    device = engine.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != config.data_parallel_size:
        raise ConfigError(
            f"cluster.num_workers={config.data_parallel_size} but {world_size} processes were "
            f"started; set cluster.num_workers={world_size} (the batch sizes derive from it)"
        )
    dataset = TokenDataset(shard_dir, "train")  # every rank checks the sizes of what it maps: cheap
    check_vocab_fits(dataset, config.model.vocab_size)
    if rank == 0:  # the driver verified checkpoint hashes already under Ray; sizes are cheap to check again
        checkpoint.select_intact(run_dir, config.train.verify_checkpoints and not driver_verified)
        checkpoint.remove_partial(run_dir)
        if not driver_verified:  # checksums and the tokenizer copy: once, not once per rank
            verify_shards(shard_dir, config.data.verify_checksums)
    dist.barrier()
    check_storage(config, run_dir)
    point = checkpoint.resume_point(run_dir, config)
    reshard = point is not None and point[1]["world_size"] != world_size and config.train.zero_stage > 0
    ds_config = deepspeed_config(
        config.train,
        world_size,
        num_parameters=count_parameters(config),
        d_model=config.model.d_model,
        on_gpu=device.type == "cuda",
        load_universal=reshard,
    )
    if rank == 0:  # the exact JSON DeepSpeed got, for the run's records
        atomic_write_json(run_dir / DEEPSPEED_CONFIG_FILE, ds_config)
    model = engine.create_model(config, ds_config)
    t = config.train
    health = StepHealth(t.max_bad_steps, t.bad_step_window)
    meter = Meter(
        tokens_per_step=t.global_batch_size * t.seq_len,
        world_size=world_size,
        device=device,
        flops_per_token=flops_per_token(model_config(config), t.seq_len),
        peak_flops=peak_flops_per_device(t.peak_flops, device),
    )
    run = Run(
        config=config,
        run_dir=run_dir,
        rank=rank,
        world_size=world_size,
        device=device,
        engine=engine.initialize(model, t, ds_config),
        loader=make_loader(dataset, config, rank, world_size),
        val_dataset=TokenDataset(shard_dir, "val"),
        sink=training_sink(run_dir, rank),
        meter=meter,
        health=health,
    )
    seed_rank(config.run.seed, rank)
    resume(run, point)
    return run, default_callbacks(config, run_dir, rank, health, evaluate)


def count_parameters(config: Config) -> int:
    with torch.device("meta"):
        return num_parameters(build_model(config))


def check_storage(config: Config, run_dir: Path) -> None:
    """The run directory is writable and has room for the run's checkpoints (pipeline/training/plan.py's size)."""
    t = config.train
    size = checkpoint_bytes(count_parameters(config), t.precision, t.zero_stage)
    existing = len(checkpoint.complete_checkpoints(run_dir))
    storage.check_storage(checkpoint.checkpoints_dir(run_dir), size, t.keep_checkpoints, existing)


def make_loader(
    dataset: TokenDataset, config: Config, rank: int, world_size: int, *, shuffle: bool = True
) -> BatchLoader:
    t = config.train
    masking = bert_masking_ids(dataset.shard_dir / SHARD_TOKENIZER_DIR) if config.model.family == "bert" else {}
    separator = dataset.index["separator_id"] if t.document_masking else None
    return BatchLoader(
        dataset,
        family=config.model.family,
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=config.run.seed,
        shuffle=shuffle,
        separator_id=separator,
        **masking,
    )


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank streams for dropout and anything else random in the loop (the model is already built)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def train(run: Run, callbacks: list[Callback]) -> TrainResult:
    """Optimizer steps until max_steps or a stop request; the callbacks log, validate and checkpoint."""
    t = run.config.train
    for callback in callbacks:
        callback.before_train(run)
    try:
        while run.step < t.max_steps and not run.stopping:
            started, lr = time.perf_counter(), engine.current_lr(run.engine)
            loss, grad_norm = train_step(run.engine, run.loader, t.grad_accum_steps, run.device)
            outcome = StepOutcome(
                loss, grad_norm, lr, time.perf_counter() - started, skipped=step_was_bad(run.engine, t.precision, loss)
            )
            run.meter.add(loss, grad_norm, lr, outcome.seconds, skipped=outcome.skipped)
            run.step += 1
            run.tokens_seen += run.tokens_per_step
            for callback in callbacks:
                callback.after_step(run, outcome)
    finally:
        for callback in callbacks:
            callback.close(run)
    return finish(run)


def train_step(model_engine, loader: BatchLoader, accum_steps: int, device: torch.device):
    """One optimizer step over `accum_steps` micro-batches; returns (mean loss, grad norm) unsynced.
    The phases are labelled for the profiler (free when it is off)."""
    total = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in loader.next_batch().items()}
        with torch.profiler.record_function("forward"):
            output = model_engine(**batch)
        with torch.profiler.record_function("backward"):
            engine.backward(model_engine, output.loss, output.logits)
        total += output.loss.detach()
        if micro_step < accum_steps - 1:
            model_engine.step()  # DeepSpeed counts micro-steps; the update happens at the boundary below
    with torch.profiler.record_function("optimizer"):
        grad_norm = engine.optimizer_step(model_engine)
    return total / accum_steps, grad_norm


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over the first eval_batches micro-batches per rank of the validation split, in order
    (the same samples every time), averaged over ranks."""
    loader = make_loader(run.val_dataset, run.config, run.rank, run.world_size, shuffle=False)
    run.engine.eval()
    total = torch.zeros((), device=run.device)
    for _ in range(run.config.train.eval_batches):
        batch = {name: tensor.to(run.device) for name, tensor in loader.next_batch().items()}
        total += run.engine(**batch).loss
    run.engine.train()
    dist.all_reduce(total)
    return total.item() / (run.config.train.eval_batches * run.world_size)


def finish(run: Run) -> TrainResult:
    figures: dict[str, Any] = run.meter.summary() | {
        "steps": run.step,
        "tokens_seen": run.tokens_seen,
        "val_loss": run.val_loss,
        "world_size": run.world_size,
        "resumed_from_step": run.resumed_from,
    }
    if run.config.train.compile:
        figures |= compilation_figures()
    return TrainResult(
        figures=figures,
        stopped=run.stopping,
        steps=run.step,
        checkpoint=str(run.last_checkpoint) if run.last_checkpoint else None,
    )
