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
from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.shards import SHARD_TOKENIZER_DIR, verify_shards
from pipeline.data.special_tokens import bert_masking_ids
from pipeline.errors import ConfigError
from pipeline.eval.validation import named_losses, scoring_for, validate, window_set
from pipeline.run.artifacts import atomic_write_json
from pipeline.run.rundir import CONFIG_FILE, DEEPSPEED_CONFIG_FILE
from pipeline.tracking.journal import training_sink
from pipeline.training import checkpoint, engine, storage
from pipeline.training.callbacks import default_callbacks
from pipeline.training.checkpoint import resume
from pipeline.training.ds_config import deepspeed_config
from pipeline.training.health import StepHealth, step_was_bad
from pipeline.training.meter import Meter, compilation_figures, peak_flops_per_device
from pipeline.training.modeling import meta_model, model_config
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
    `driver_verified`: the driver already checked the shards and the checkpoint hashes; otherwise rank 0
    does, the others wait."""
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
    model = engine.create_model(config, ds_config, fresh=point is None)
    t, val_dataset = config.train, TokenDataset(shard_dir, "val")
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
        val_dataset=val_dataset,
        val_windows=window_set(val_dataset, config.model.family, t.seq_len, config.eval.max_windows),
        sink=training_sink(run_dir, rank),
        meter=meter,
        health=health,
    )
    seed_rank(config.run.seed, rank)
    resume(run, point)
    return run, default_callbacks(config, run_dir, rank, health, evaluate)


def count_parameters(config: Config) -> int:
    return num_parameters(meta_model(config))


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
            loss, grad_norm = train_step(run.engine, run.loader, t.grad_accum_steps, run.device, run.world_size)
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


def train_step(model_engine, loader: BatchLoader, accum_steps: int, device: torch.device, world_size: int):
    """One optimizer step over `accum_steps` micro-batches; returns (loss, grad norm) unsynced. The loss
    is the mean over the step's target tokens on every rank (BERT's masked counts differ between
    micro-batches), so micro-batch 4 x accumulation 2 gives micro-batch 8's gradients; the value
    returned is this rank's share of it x world_size. The phases are labelled for the profiler."""
    batches = [{k: v.to(device, non_blocking=True) for k, v in loader.next_batch().items()} for _ in range(accum_steps)]
    targets = torch.stack([(batch["labels"] != IGNORE_INDEX).sum() for batch in batches]).sum().float()
    dist.all_reduce(targets)  # one small all-reduce per step; nothing waits for the host
    # DeepSpeed divides each micro-step's loss by accum_steps and averages gradients over ranks: undo both.
    scale = accum_steps * world_size / targets
    total = torch.zeros((), device=device)
    for micro_step, batch in enumerate(batches):
        labels = batch.pop("labels")
        with torch.profiler.record_function("forward"):
            output = model_engine(**batch, labels=labels, loss_reduction="sum")  # nats, in fp32, no logits kept
            loss = output.loss * scale
        with torch.profiler.record_function("backward"):
            engine.backward(model_engine, loss, output.hidden)
        total += loss.detach()
        if micro_step < accum_steps - 1:
            model_engine.step()  # DeepSpeed counts micro-steps; the update happens at the boundary below
    with torch.profiler.record_function("optimizer"):
        grad_norm = engine.optimizer_step(model_engine)
    return total / accum_steps, grad_norm


def evaluate(run: Run) -> dict[str, float]:
    """`val/loss` and per-source losses over the fixed validation windows, the eval stage's too
    (pipeline/eval/validation.py): the same figure at any world size and micro-batch."""
    run.engine.eval()
    sums = validate(
        run.engine,
        run.val_dataset,
        run.val_windows,
        scoring_for(run.config, run.val_dataset),
        micro_batch_size=run.config.train.micro_batch_size,
        rank=run.rank,
        world_size=run.world_size,
        device=run.device,
        all_reduce=dist.all_reduce,
    )
    run.engine.train()
    return named_losses(sums, run.val_dataset.source_names())


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
