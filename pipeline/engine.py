"""The DeepSpeed wrapper: the only module of the project that imports deepspeed.

It turns a model and the `train` section into a DeepSpeed engine (AdamW with weight-decay groups, the
learning-rate schedule, ZeRO 0-3 with optional offload), sets up torch.distributed when nobody else
has (torchrun; Ray Train sets up gloo or NCCL itself), and wraps checkpoint save/load and the export
of a consolidated fp32 state dict from any ZeRO stage.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set first)
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

from models.layers import init_weights  # noqa: E402
from pipeline.config import Config, TrainConfig  # noqa: E402
from pipeline.modeling import build_model  # noqa: E402


def backend() -> str:
    """NCCL when CUDA is available, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed() -> torch.device:
    """Join the process group (torchrun's env:// variables) unless one exists (Ray Train made it);
    returns this rank's device."""
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend(), verbose=False)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of the peak: linear warmup over
    `warmup_steps` steps ((step+1)/warmup, so the first step already learns), then cosine, linear or
    constant decay that reaches `min_lr_ratio` at `max_steps` and stays there."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def lr_schedule(train: TrainConfig):
    """A callable DeepSpeed turns into the scheduler: LambdaLR over `lr_multiplier`."""
    def multiplier(step: int) -> float:
        return lr_multiplier(step, warmup_steps=train.warmup_steps, max_steps=train.max_steps,
                             schedule=train.schedule, min_lr_ratio=train.min_lr_ratio)

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices decay; norms, biases and embedding tables (a tied output projection
    is the embedding) do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # each tied parameter once
        if not param.requires_grad:
            continue
        no_decay_param = _is_vector(param) or id(param) in embeddings
        (no_decay if no_decay_param else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _is_vector(param: nn.Parameter) -> bool:
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitions keep the full shape in ds_shape
    return len(shape) < 2


def create_model(config: Config, ds_config: dict[str, Any]) -> nn.Module:
    """The seeded model; under ZeRO-3 built inside `deepspeed.zero.Init`, so each rank only ever holds
    its partition (parameters are gathered one module at a time for initialization).

    zero.Init also replaces torch.nn.functional.linear, for the rest of the process, by DeepSpeed's
    LinearFunctionForZeroStage3: F.linear on 3-D inputs saves a transposed *view* of the gathered
    weight for backward, which keeps every gathered weight alive until backward (a whole extra model
    per rank); DeepSpeed's function saves the parameter itself. Same math, other rounding order."""
    if config.train.zero_stage != 3:
        model = build_model(config)
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):  # dtype from ds_config (its dtype= is buggy)
            model = build_model(config)
        _initialize_partitioned(model)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def _initialize_partitioned(model: nn.Module) -> None:
    """Rerun the model's own `init_weights` on a ZeRO-3 model, one module's parameters gathered at a
    time, in named_parameters order (so the random stream, and the weights, equal a plain build)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                init_weights(_ParameterView(module_name, own, module), model.config)


class _ParameterView:
    """What `init_weights` reads of a model (named_parameters, modules), restricted to one module's
    own parameters under their full names."""

    def __init__(self, prefix: str, named: list[tuple[str, nn.Parameter]], module: nn.Module):
        self._named = [(f"{prefix}.{name}" if prefix else name, p) for name, p in named]
        self._module = module

    def named_parameters(self):
        return iter(self._named)

    def modules(self):
        return iter([self._module])


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.blocks:
        forward = block.forward
        block.forward = lambda *args, _forward=forward, **kwargs: checkpoint(_forward, *args,
                                                                            use_reentrant=False, **kwargs)


def initialize(model: nn.Module, train: TrainConfig, ds_config: dict[str, Any]):
    """The DeepSpeed engine: AdamW over the weight-decay groups, the LR schedule, ZeRO per ds_config;
    the module compiled with torch.compile when train.compile is set."""
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, train.weight_decay),
                                      lr_scheduler=lr_schedule(train), config=ds_config)
    if train.compile:
        engine.compile()
    return engine


def optimizer_step(engine) -> torch.Tensor | float | None:
    """engine.step() (clip, update, schedule, zero grads); returns the global gradient norm before
    clipping. DeepSpeed keeps none in fp32 without ZeRO, so it is computed here (a tensor: no sync)."""
    norm = None
    if not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled()):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    engine.step()
    return norm if norm is not None else engine.get_global_grad_norm()


def save_checkpoint(engine, checkpoints_dir: Path, tag: str) -> None:
    """Every rank must call this: each writes its own shard of `<checkpoints_dir>/<tag>/`."""
    engine.save_checkpoint(str(checkpoints_dir), tag=tag, save_latest=False)


def load_checkpoint(engine, checkpoints_dir: Path, tag: str) -> None:
    """Restore model, optimizer, scheduler (and loss scaler) from `<checkpoints_dir>/<tag>/`."""
    path, _ = engine.load_checkpoint(str(checkpoints_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{checkpoints_dir / tag}: DeepSpeed found no checkpoint to load; delete "
                                f"the directory to start over")
    scheduler = engine.lr_scheduler  # apply the schedule of the current config (max_steps may have changed)
    for group, base_lr, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                          scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)


def convert_to_universal(checkpoint: Path, out_dir: Path) -> None:
    """Write DeepSpeed's universal form of a ZeRO 1-3 checkpoint (one file per parameter and state,
    unpartitioned) to out_dir; an engine with `checkpoint.load_universal` loads it on any world size."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out_dir),
                                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                           strict=True, inject_missing_state=True))


def current_lr(engine) -> float:
    return engine.get_lr()[0]


def consolidated_state_dict(checkpoints_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """An fp32 state dict of the whole model from a checkpoint of any ZeRO stage (runs on one process,
    no process group needed): ZeRO 1-3 shards are merged by DeepSpeed's zero_to_fp32; stage 0
    checkpoints already hold the full module."""
    tag_dir = Path(checkpoints_dir) / tag
    if any(tag_dir.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir), tag=tag)
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {name: tensor.float() for name, tensor in states["module"].items()}
