"""The train stage: DeepSpeed ZeRO training of a GPT or BERT on token shards.

`train_worker(loop_config)` is the per-rank function. It only needs torch.distributed to be set up, so
it runs in a Ray Train `TorchTrainer` worker group (`run_training`, the driver) and under torchrun:

    torchrun --nproc_per_node 2 -m pipeline.train --run-dir RUN_DIR --shards SHARD_DIR

where RUN_DIR holds the resolved `config.yaml`. Checkpoints, the `latest` pointer and their layout are
described in pipeline/checkpoint.py.

Resume. Starting a run whose directory holds a complete checkpoint resumes it: engine state, loader
position, every rank's RNG states, step and tokens seen; with the same world size every later loss
equals the uninterrupted run's bit for bit (fp32). Config changes are checked against the checkpoint:
the model, tokenizer, data, seed, seq_len, ZeRO stage, precision and offload are refused, anything
else (max_steps, cadences, learning rate, ...) is allowed and printed. The world size may change:
the data position is mapped by global samples consumed (the loader's state), and per ZeRO stage
- stage 0: weights and optimizer state are whole in every checkpoint: loaded as they are;
- stages 1-3: optimizer state (and at stage 3 the weights) are partitioned by world size, and DeepSpeed
  loads partitions only for the world size that wrote them (its `elastic_checkpoint` needs a `step` in
  the optimizer's param groups, which torch's AdamW does not keep). Rank 0 therefore converts the
  checkpoint to DeepSpeed's universal format first (`ds_to_universal`: seconds for small models, a full
  copy of the model states on disk for large ones) and every rank loads its new partition from it.
The global batch follows the new world size unless train.global_batch_size pins it; the loss curve
continues but is not the old world size's bit for bit (different batches per step and reduction order).
Ranks that did not exist when the checkpoint was saved start from the seeded RNG state.

Non-finite steps. A step whose loss or reduced gradients are not finite on any rank is skipped (no
update, no scheduler step; see pipeline/engine.py) and counted (`train/skipped_steps`); the loader
moves on. More than train.max_bad_steps of them within train.bad_step_window steps roll the run back
to the latest checkpoint (weights, optimizer, RNG, step) while the loader keeps its position, so
training continues with the data after the bad batch (`train/rollbacks`, logged at the step that
triggered it). Without a checkpoint to return to, or after MAX_ROLLBACKS_PER_CHECKPOINT rollbacks to
the same one, training stops with TrainingDiverged.

Checkpoint requests. SIGUSR1 to a worker asks for a checkpoint at the next step boundary; SIGTERM for a
checkpoint and a clean stop. The driver forwards both by writing `<run_dir>/checkpoint_request`
(Ray runs the training function outside the main thread, where no signal handler can be installed).
All ranks agree on a request through one all-reduce per step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models import flops_per_token, num_parameters
from pipeline import checkpoint, engine as ds_engine
from pipeline.artifacts import atomic_write_json
from pipeline.config import Config, ConfigError, dump_config, load_config
from pipeline.data import BatchLoader, DataError, TokenDataset, check_vocab_fits
from pipeline.ds_config import deepspeed_config
from pipeline.errors import CheckpointError, StorageError, TrainingDiverged
from pipeline.modeling import build_model, model_config
from pipeline.plan import checkpoint_bytes
from pipeline.tracking import METRIC_TOKENS_PER_S, METRIC_TOKENS_SEEN, METRIC_TRAIN_LOSS, METRIC_VAL_LOSS, open_tracker

FIGURES_FILE = "train_figures.json"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
REQUEST_FILE = "checkpoint_request"
NO_REQUEST, CHECKPOINT, CHECKPOINT_AND_STOP = 0, 1, 2
# Returning to one checkpoint more often than this means the trouble is not a passing bad batch.
MAX_ROLLBACKS_PER_CHECKPOINT = 3
METRIC_SKIPPED_STEPS = "train/skipped_steps"
METRIC_ROLLBACKS = "train/rollbacks"
GIB = 1024**3

# Dense bf16/fp16 tensor-core peak FLOP/s of one GPU (vendor data sheets, without sparsity), matched
# against torch.cuda.get_device_name in this order. A hard-coded A100 figure gave "104% MFU" on H100s.
GPU_PEAK_FLOPS = (
    (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12), (r"\b(H100|H200|GH200|H800)\b", 989e12),
    (r"\bB200\b", 2250e12), (r"\bA100\b", 312e12), (r"\bA800\b", 312e12), (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12), (r"\bL4\b", 121e12), (r"\bA10\b", 125e12), (r"\bA30\b", 165e12),
    (r"\bV100\b", 125e12), (r"\bT4\b", 65e12), (r"\bMI300X\b", 1307e12), (r"\bMI250X?\b", 383e12),
)


def peak_flops_per_device(configured: float | None, device: torch.device) -> float | None:
    """train.peak_flops if set, else the table entry for this GPU; None when unknown (MFU not logged)."""
    if configured is not None or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((flops for pattern, flops in GPU_PEAK_FLOPS if re.search(pattern, name)), None)


@dataclass
class Run:
    """Everything `setup` builds for one rank; `step` and `tokens_seen` advance during training."""

    config: Config
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    engine: Any
    loader: BatchLoader
    val_dataset: TokenDataset
    tracker: Any
    flops_per_token: int
    peak_flops: float | None
    requests: CheckpointRequests
    health: StepHealth
    step: int = 0
    tokens_seen: int = 0
    resumed_from: int | None = None
    val_loss: float | None = None
    last_checkpoint: Path | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.config.train.seq_len


# ---------------------------------------------------------------------------------------------
# Entry points


def train_worker(loop_config: dict[str, str]) -> dict[str, Any]:
    """One rank's training, with torch.distributed already set up (Ray Train) or set up from the
    torchrun environment here. loop_config: {"run_dir": ..., "shard_dir": ...}. Returns the figures
    (rank 0 also writes them to `<run_dir>/train_figures.json`)."""
    run_dir = Path(loop_config["run_dir"])
    config = load_config(run_dir / "config.yaml")
    run = setup(config, run_dir, Path(loop_config["shard_dir"]))
    try:
        figures = train(run)
    except BaseException:
        run.tracker.finish("FAILED")
        raise
    finally:
        run.requests.close()
    run.tracker.finish("FINISHED")
    return figures


def setup(config: Config, run_dir: Path, shard_dir: Path) -> Run:
    """Process group, resume checks, data, model, DeepSpeed engine, tracker; then load `latest` if any."""
    device = ds_engine.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != config.data_parallel_size:
        raise ConfigError(f"cluster.num_workers={config.data_parallel_size} but {world_size} processes were "
                          f"started; set cluster.num_workers={world_size} (the batch sizes derive from it)")
    if rank == 0:
        checkpoint.remove_partial(run_dir)
    dist.barrier()
    check_storage(config, run_dir)
    point = checkpoint.resume_point(run_dir, config)
    reshard = point is not None and point[1]["world_size"] != world_size and config.train.zero_stage > 0
    dataset = TokenDataset(shard_dir, "train", verify_checksums=config.data.verify_checksums)
    check_vocab_fits(dataset, config.model.vocab_size)
    ds_config = deepspeed_config(config.train, world_size, num_parameters=_count_parameters(config),
                                 d_model=config.model.d_model, on_gpu=device.type == "cuda", load_universal=reshard)
    if rank == 0:  # the exact JSON DeepSpeed got, for the run's records
        atomic_write_json(run_dir / DEEPSPEED_CONFIG_FILE, ds_config)
    model = ds_engine.create_model(config, ds_config)
    run = Run(config=config, run_dir=run_dir, rank=rank, world_size=world_size, device=device,
              engine=ds_engine.initialize(model, config.train, ds_config),
              loader=make_loader(dataset, config, rank, world_size),
              val_dataset=TokenDataset(shard_dir, "val"), tracker=open_tracker(config, run_dir, rank=rank),
              flops_per_token=flops_per_token(model_config(config), config.train.seq_len),
              peak_flops=peak_flops_per_device(config.train.peak_flops, device),
              requests=CheckpointRequests(run_dir, rank),
              health=StepHealth(config.train.max_bad_steps, config.train.bad_step_window))
    seed_rank(config.run.seed, rank)
    resume(run, point)
    return run


def _count_parameters(config: Config) -> int:
    with torch.device("meta"):
        return num_parameters(build_model(config))


def check_storage(config: Config, run_dir: Path) -> None:
    """The run directory is writable and has room for the run's checkpoints (pipeline/plan.py's size)."""
    t = config.train
    size = checkpoint_bytes(_count_parameters(config), t.precision, t.zero_stage)
    checkpoint.check_storage(run_dir, size, t.keep_checkpoints)


def make_loader(dataset: TokenDataset, config: Config, rank: int, world_size: int, *,
                shuffle: bool = True) -> BatchLoader:
    t = config.train
    return BatchLoader(dataset, family=config.model.family, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                       rank=rank, world_size=world_size, seed=config.run.seed, shuffle=shuffle,
                       **special_tokens(dataset))


def special_tokens(dataset: TokenDataset) -> dict[str, Any]:
    """BERT masking needs the [MASK] id and the ids never to mask, from the shards' copy of the tokenizer."""
    if dataset.index["family"] != "bert":
        return {}
    from pipeline.shard import SHARD_TOKENIZER_DIR
    from pipeline.tokenizer import special_token_ids

    special = special_token_ids(dataset.shard_dir / SHARD_TOKENIZER_DIR, "bert")
    return {"mask_token_id": special.mask, "special_token_ids": special.all}


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank streams for dropout and anything else random in the loop (the model is already built)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


# ---------------------------------------------------------------------------------------------
# The loop


def train(run: Run) -> dict[str, Any]:
    """Optimizer steps until max_steps or a stop request; logs, evaluates and checkpoints on cadence."""
    t = run.config.train
    meter = Meter(run)
    stop = False
    while run.step < t.max_steps and not stop:
        started, lr = time.perf_counter(), ds_engine.current_lr(run.engine)
        loss, grad_norm = train_step(run.engine, run.loader, t.grad_accum_steps, run.device)
        bad = step_was_bad(run, loss)
        request = run.requests.agreed(run.device)
        meter.add(loss, grad_norm, lr, time.perf_counter() - started, skipped=bad)
        run.step += 1
        run.tokens_seen += run.tokens_per_step
        if bad and run.health.too_many(run.step):
            roll_back(run, meter)
            stop = request == CHECKPOINT_AND_STOP  # the checkpoint just loaded is the one to stop at
            continue
        if run.step % t.log_every == 0:
            log_metrics(run, meter.flush())
        if t.eval_every and (run.step % t.eval_every == 0 or run.step == t.max_steps):
            run.val_loss = evaluate(run)
            log_metrics(run, {METRIC_VAL_LOSS: run.val_loss})
        stop = request == CHECKPOINT_AND_STOP
        if request or run.step == t.max_steps or (t.checkpoint_every and run.step % t.checkpoint_every == 0):
            save_checkpoint(run)
    return finish(run, meter, stopped=stop)


def train_step(engine, loader: BatchLoader, accum_steps: int, device: torch.device):
    """One optimizer step over `accum_steps` micro-batches; returns (mean loss, grad norm) unsynced."""
    total = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in loader.next_batch().items()}
        output = engine(**batch)
        ds_engine.backward(engine, output.loss, output.logits)
        total += output.loss.detach()
        if micro_step < accum_steps - 1:
            engine.step()  # DeepSpeed counts micro-steps; the update happens at the boundary below
    return total / accum_steps, ds_engine.optimizer_step(engine)


# ---------------------------------------------------------------------------------------------
# Non-finite steps and rollback


def step_was_bad(run: Run, loss: torch.Tensor) -> bool:
    """Whether the step's update was skipped for non-finite values; every rank gets the same answer,
    as the skip is decided on all-reduced gradients. fp16's loss scaler also skips steps that overflow
    only because its scale is too high, which is routine: those count only if some rank's loss was
    non-finite (one more all-reduce, on skipped fp16 steps only)."""
    if ds_engine.step_applied(run.engine):
        return False
    if run.config.train.precision != "fp16":
        return True
    bad = (~torch.isfinite(loss)).to(torch.int32)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


class StepHealth:
    """Bad (skipped) steps within the last `window` steps, and the run's totals of skips and rollbacks."""

    def __init__(self, max_bad_steps: int, window: int):
        self.max_bad_steps, self.window = max_bad_steps, window
        self.recent: deque[int] = deque()
        self.skipped_steps, self.rollbacks = 0, 0
        self.rollbacks_to: Counter[str] = Counter()

    def too_many(self, step: int) -> bool:
        """Count a bad step; True when it makes more than max_bad_steps within the window."""
        self.skipped_steps += 1
        self.recent.append(step)
        while self.recent[0] <= step - self.window:
            self.recent.popleft()
        return len(self.recent) > self.max_bad_steps

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps, self.rollbacks = state.get("skipped_steps", 0), state.get("rollbacks", 0)


def roll_back(run: Run, meter: Meter) -> None:
    """Too many bad steps: log them, then reload `latest` (engine, RNG, step, tokens) but keep the
    loader's position, so the bad data is not fed again."""
    health, bad_step, t = run.health, run.step, run.config.train
    tag = checkpoint.latest_tag(run.run_dir)
    why = f"{len(health.recent)} of the last {t.bad_step_window} steps had a non-finite loss or gradient"
    if tag is None or health.rollbacks_to[tag] >= MAX_ROLLBACKS_PER_CHECKPOINT:
        where = "no checkpoint to roll back to" if tag is None else f"already rolled back to {tag} " \
                f"{MAX_ROLLBACKS_PER_CHECKPOINT} times"
        raise TrainingDiverged(f"step {bad_step}: {why} (train.max_bad_steps={t.max_bad_steps}) and {where}; "
                               "lower train.lr or raise train.warmup_steps, check the data near this step, "
                               "or checkpoint more often (train.checkpoint_every)")
    health.rollbacks += 1
    health.rollbacks_to[tag] += 1
    log_metrics(run, meter.flush() | {METRIC_ROLLBACKS: health.rollbacks})
    path = checkpoint.checkpoints_dir(run.run_dir) / tag
    load_state(run, path, checkpoint.read_trainer_state(path), restore_loader=False)
    health.recent.clear()
    if run.rank == 0:
        print(f"step {bad_step}: {why}; rolled back to {path} (step {run.step}), continuing with the data "
              "after the bad batch", flush=True)


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


def finish(run: Run, meter: Meter, *, stopped: bool) -> dict[str, Any]:
    """The run's figures; rank 0 also writes them to train_figures.json."""
    figures = meter.summary() | {
        "steps": run.step, "tokens_seen": run.tokens_seen, "val_loss": run.val_loss, "world_size": run.world_size,
        "resumed_from_step": run.resumed_from, "stopped_on_request": stopped,
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
    }
    if run.rank == 0:
        (run.run_dir / FIGURES_FILE).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return figures


# ---------------------------------------------------------------------------------------------
# Metrics


class Meter:
    """Loss, grad norm, throughput, MFU and memory over the steps since the last log line. Step times
    exclude evaluation and checkpoints; on GPU the window ends with the loss sync, whose wait counts."""

    def __init__(self, run: Run):
        self.run = run
        self.losses: list[torch.Tensor] = []
        self.grad_norm, self.lr = None, None
        self.window_steps, self.window_seconds = 0, 0.0
        self.total_seconds, self.total_steps = 0.0, 0
        self.last_loss: float | None = None

    def add(self, loss: torch.Tensor, grad_norm, lr: float, seconds: float, *, skipped: bool) -> None:
        """A skipped step's loss and grad norm are not finite: they count in throughput only."""
        if not skipped:
            self.losses.append(loss)
            self.grad_norm = grad_norm
        self.lr = lr
        self.window_steps += 1
        self.window_seconds += seconds

    def flush(self) -> dict[str, float | None]:
        """Metrics of the window (one all-reduce for the loss), then start a new window."""
        run, steps, started = self.run, self.window_steps, time.perf_counter()
        window_loss = None
        if self.losses:  # every rank skips the same steps, so all or none join this all-reduce
            loss = torch.stack(self.losses).sum()
            dist.all_reduce(loss)
            window_loss = self.last_loss = loss.item() / (len(self.losses) * run.world_size)
        seconds = self.window_seconds + time.perf_counter() - started
        self.total_seconds, self.total_steps = self.total_seconds + seconds, self.total_steps + steps
        tokens_per_s = steps * run.tokens_per_step / seconds
        metrics = {
            METRIC_TRAIN_LOSS: window_loss, "train/lr": self.lr, METRIC_SKIPPED_STEPS: run.health.skipped_steps,
            "train/grad_norm": None if self.grad_norm is None else float(self.grad_norm),
            METRIC_TOKENS_PER_S: tokens_per_s, METRIC_TOKENS_SEEN: run.tokens_seen,
            "train/mfu": mfu(tokens_per_s, run), "train/step_time_s": seconds / steps,
            **memory_metrics(run.device),
        }
        self.losses, self.grad_norm, self.window_steps, self.window_seconds = [], None, 0, 0.0
        return metrics

    def summary(self) -> dict[str, Any]:
        tokens_per_s = self.total_steps * self.run.tokens_per_step / self.total_seconds if self.total_steps else None
        return {"train_loss": self.last_loss, "tokens_per_s": tokens_per_s,
                "mfu": mfu(tokens_per_s, self.run) if tokens_per_s else None,
                "train_seconds": round(self.total_seconds, 3)}


def mfu(tokens_per_s: float, run: Run) -> float | None:
    """Model FLOPs utilization: achieved training FLOP/s over the peak of all devices."""
    if run.peak_flops is None:
        return None
    return run.flops_per_token * tokens_per_s / (run.peak_flops * run.world_size)


def memory_metrics(device: torch.device) -> dict[str, float]:
    """GPU: allocated and peak allocated; CPU: resident set size now and at its peak (this rank)."""
    if device.type == "cuda":
        return {"train/memory_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
                "train/memory_peak_gib": torch.cuda.max_memory_allocated(device) / GIB}
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"train/rss_gib": rss / GIB, "train/rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def log_metrics(run: Run, metrics: dict[str, float | None]) -> None:
    """Rank 0: to the tracker (and metrics.jsonl) and one console line."""
    if run.rank != 0:
        return
    known = {name: value for name, value in metrics.items() if value is not None}
    run.tracker.log_metrics(known, step=run.step)
    shown = " | ".join(f"{name.removeprefix('train/')} {value:.4g}" for name, value in known.items())
    print(f"step {run.step}/{run.config.train.max_steps} | {shown}", flush=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints, resume and requests


def save_checkpoint(run: Run) -> None:
    run.last_checkpoint = checkpoint.save(
        run.run_dir, run.step, rank=run.rank, barrier=dist.barrier, keep=run.config.train.keep_checkpoints,
        save_engine=lambda root, tag: ds_engine.save_checkpoint(run.engine, root, tag),
        trainer_state={"step": run.step, "tokens_seen": run.tokens_seen, "loader": run.loader.state_dict(),
                       "world_size": run.world_size, "mlflow_run_id": run.tracker.run_id, **run.health.state_dict(),
                       "config_fingerprint": checkpoint.fingerprint(run.config),
                       "config": run.config.model_dump(mode="json")})


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
        run.tracker.set_tags({"train.resumed_from_step": run.step})


def load_state(run: Run, path: Path, state: dict[str, Any], *, restore_loader: bool) -> None:
    """Engine, RNG, step and tokens (and the loader's position if asked) from the checkpoint at path,
    after checking its files hold nothing but data. ZeRO partitions of another world size load through
    DeepSpeed's universal format (converted by rank 0 next to the checkpoint, then deleted)."""
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


class CheckpointRequests:
    """SIGUSR1 -> checkpoint at the next step boundary; SIGTERM -> checkpoint and stop. Also reads
    `<run_dir>/checkpoint_request` (written by the driver on the same signals)."""

    def __init__(self, run_dir: Path, rank: int):
        self.path, self.rank, self.flag = Path(run_dir) / REQUEST_FILE, rank, NO_REQUEST
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGUSR1, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self.flag = max(self.flag, CHECKPOINT_AND_STOP if signum == signal.SIGTERM else CHECKPOINT)

    def agreed(self, device: torch.device) -> int:
        """The strongest request of any rank (one small all-reduce); clears it."""
        local = self.flag
        if self.rank == 0 and self.path.exists():
            local = max(local, CHECKPOINT_AND_STOP if self.path.read_text().strip() == "stop" else CHECKPOINT)
            self.path.unlink(missing_ok=True)
        flag = torch.tensor(local, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.flag = NO_REQUEST
        return int(flag.item())

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------
# Driver: a Ray Train worker group


def run_training(config: Config, shard_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Train in a Ray Train TorchTrainer worker group (cluster.num_workers ranks, gloo on CPU, NCCL on
    GPU) attached to the running Ray, or to cluster.address, or to an embedded local Ray; returns the
    figures of train_worker. Resumes when run_dir holds a checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.orchestrate import ray_connection

    run_dir, c = Path(run_dir).resolve(), config.cluster
    run_dir.mkdir(parents=True, exist_ok=True)
    check_storage(config, run_dir)  # fail in a second, before starting the worker group
    (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    (run_dir / FIGURES_FILE).unlink(missing_ok=True)
    resources = {"CPU": c.cpus_per_worker} | ({"GPU": 1} if c.use_gpu else {})
    trainer = TorchTrainer(
        train_worker, train_loop_config={"run_dir": str(run_dir), "shard_dir": str(Path(shard_dir).resolve())},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=RunConfig(name="train", storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=c.max_failures)))
    with ray_connection(config), forward_signals(run_dir):
        trainer.fit()
    return json.loads((run_dir / FIGURES_FILE).read_text(encoding="utf-8"))


@contextmanager
def forward_signals(run_dir: Path):
    """While the workers train, SIGUSR1/SIGTERM to this driver become a checkpoint request file."""
    def forward(signum, frame):
        (run_dir / REQUEST_FILE).write_text("stop" if signum == signal.SIGTERM else "checkpoint")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------------------------
# torchrun entry


def main(argv: list[str] | None = None) -> None:
    """`torchrun ... -m pipeline.train --run-dir DIR --shards DIR`. Ends with destroy_process_group()
    and os._exit: about 1 in 20 two-rank runs otherwise aborted at interpreter exit ("terminate called
    without an active exception") while background threads were torn down."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory holding the resolved config.yaml")
    parser.add_argument("--shards", required=True, help="shard directory (holding index.json)")
    args = parser.parse_args(argv)
    code = 0
    try:
        train_worker({"run_dir": args.run_dir, "shard_dir": args.shards})
    except (ConfigError, DataError, StorageError, CheckpointError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)


if __name__ == "__main__":
    main()
