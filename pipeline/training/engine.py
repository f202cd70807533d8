"""The DeepSpeed wrapper: the only module of the project that imports deepspeed.

It turns a model and the `train` section into a DeepSpeed engine (AdamW with weight-decay groups, the
learning-rate schedule, ZeRO 0-3 with optional offload), sets up torch.distributed when nobody else
has (torchrun; Ray Train sets up gloo or NCCL itself), and wraps checkpoint save/load and the export
of a consolidated fp32 state dict from any ZeRO stage.

Non-finite steps. A step whose reduced gradients hold inf or NaN is skipped: no optimizer update, no
scheduler step, gradients dropped. DeepSpeed's ZeRO 1-3, bf16 and fp16 optimizers do this themselves
(an `overflow` check after the reduction, so every rank agrees); with fp32 and ZeRO 0 the engine holds
the client torch optimizer, which has no such check, so `optimizer_step` does it through the same
`optimizer.overflow` attribute DeepSpeed reads from its own optimizers. `backward` turns a non-finite
loss into NaN gradients, so the same check also skips steps whose loss alone was not finite: the
loss's own gradients can be finite (an infinite cross-entropy; a NaN mean over zero target tokens
has zero gradients).

Loading. DeepSpeed unpickles checkpoints with `weights_only=False`, which runs any code a tampered
file carries. `verify_checkpoint` therefore lists every pickled global in every file of a checkpoint
(without loading it) and refuses anything beyond tensors, containers and the four DeepSpeed types its
checkpoints hold; our own loads use `weights_only=True` with those types allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.run.runtime import accelerator_name, distributed_backend

# DeepSpeed picks its accelerator once, at import, from this variable (and prints a warning to stdout
# without it): the one process-wide setting the project makes, before the one deepspeed import.
os.environ.setdefault("DS_ACCELERATOR", accelerator_name())

# DeepSpeed's autotuner, which the project does not use, imports mlflow when deepspeed is imported
# and does without it when that import fails: 1 s of every rank's start-up (bench/startup.py) for a
# package the ranks never use (the driver owns the MLflow run). A None entry in sys.modules is
# Python's way to make `import mlflow` fail; it is removed again right after, unless mlflow was
# already imported, in which case nothing changes.
_MLFLOW_WAS_IMPORTED = "mlflow" in sys.modules
sys.modules.setdefault("mlflow", None)
try:
    import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set first)
finally:
    if not _MLFLOW_WAS_IMPORTED:
        del sys.modules["mlflow"]
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

from models.layers import init_weights  # noqa: E402
from pipeline.config import Config, TrainConfig  # noqa: E402
from pipeline.errors import CheckpointError  # noqa: E402
from pipeline.training.modeling import build_model  # noqa: E402
from pipeline.training.pretrained import HFWeights, copy_parameters, load_pretrained, open_weights  # noqa: E402
from pipeline.training.schedule import lr_multiplier  # noqa: E402

# The non-tensor types DeepSpeed pickles into its checkpoints (ZeRO optimizer states, loss scalers):
# plain data holders whose unpickling runs no code of the file's choosing.
SAFE_GLOBALS = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def init_distributed() -> torch.device:
    """Join the process group (torchrun's env:// variables) unless one exists (Ray Train made it);
    returns this rank's device."""
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=distributed_backend(torch.cuda.is_available()), verbose=False)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def lr_schedule(train: TrainConfig):
    """A callable DeepSpeed turns into the scheduler: LambdaLR over `lr_multiplier`."""

    def multiplier(step: int) -> float:
        return lr_multiplier(step, train)

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
    # `decays` travels with the group through DeepSpeed and its checkpoints: `apply_hyperparameters`
    # reads it to give a resumed run the current weight decay. DeepSpeed's Muon splits each group into
    # halves named after it ("decay-muon-params", ...), keeping no other key: the name says it there.
    return [
        {"params": decay, "weight_decay": weight_decay, "decays": True, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "decays": False, "name": "no_decay"},
    ]


def _is_vector(param: nn.Parameter) -> bool:
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitions keep the full shape in ds_shape
    return len(shape) < 2


def create_model(config: Config, ds_config: dict[str, Any], *, fresh: bool = True) -> nn.Module:
    """The seeded model, or with model.init_from and `fresh` (no checkpoint to resume) the model holding
    those weights; under ZeRO-3 built inside `deepspeed.zero.Init`, so each rank only ever holds its
    partition (parameters are gathered one module at a time for initialization or loading).

    zero.Init also replaces torch.nn.functional.linear, for the rest of the process, by DeepSpeed's
    LinearFunctionForZeroStage3: F.linear on 3-D inputs saves a transposed *view* of the gathered
    weight for backward, which keeps every gathered weight alive until backward (a whole extra model
    per rank); DeepSpeed's function saves the parameter itself. Same math, other rounding order."""
    init_from = config.model.init_from if fresh else None  # a resume loads its checkpoint over the model
    if config.train.zero_stage != 3:
        model = build_model(config)
        if init_from:
            load_pretrained(model, init_from)
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):  # dtype from ds_config (its dtype= is buggy)
            model = build_model(config)
        if init_from:
            _load_partitioned(model, init_from)
        else:
            _initialize_partitioned(model)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def _initialize_partitioned(model: nn.Module) -> None:
    """Rerun the model's own `init_weights` on a ZeRO-3 model, one module's parameters gathered at a
    time, in named_parameters order (so the random stream, and the weights, equal a plain build)."""
    for module_name, module, own in _modules_with_own_parameters(model):
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
            init_weights(_ParameterView(module_name, own, module), model.config)


def _load_partitioned(model: nn.Module, init_from: str) -> None:
    """Load HF weights into a ZeRO-3 model one module at a time: rank 0 reads each module's tensors
    while they are gathered, and DeepSpeed scatters them; no rank ever holds the whole model."""
    rank = torch.distributed.get_rank()
    with open_weights(init_from) if rank == 0 else contextlib.nullcontext({}) as readers:
        weights = HFWeights(model, readers, init_from) if rank == 0 else None
        for module_name, _, own in _modules_with_own_parameters(model):
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                if weights is not None:
                    copy_parameters(weights, ((f"{module_name}.{name}".lstrip("."), p) for name, p in own))


def _modules_with_own_parameters(model: nn.Module):
    """(module name, module, [(name, parameter)]) of each module owning parameters, each parameter once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            yield module_name, module, own


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
        block.forward = lambda *args, _forward=forward, **kwargs: checkpoint(
            _forward, *args, use_reentrant=False, **kwargs
        )


def initialize(model: nn.Module, train: TrainConfig, ds_config: dict[str, Any]):
    """The DeepSpeed engine: AdamW over the weight-decay groups, the LR schedule, ZeRO per ds_config;
    the module compiled with torch.compile when train.compile is set."""
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, train.weight_decay),
        lr_scheduler=lr_schedule(train),
        config=ds_config,
    )
    if _plain_fp32(engine):
        _skip_steps_on_overflow(engine.optimizer)
    if train.compile:
        engine.compile()
    return engine


def _skip_steps_on_overflow(optimizer: torch.optim.Optimizer) -> None:
    """Give the client torch optimizer the `overflow` flag of DeepSpeed's own optimizers: while it is
    set, step() does nothing (DeepSpeed calls it unconditionally, then reads the flag to skip the
    scheduler and count the step). Dropping the gradients instead breaks DeepSpeed's clipping, which
    needs at least one."""
    step = optimizer.step

    def step_unless_overflow(*args, **kwargs):
        return None if optimizer.overflow else step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = step_unless_overflow


def backward(engine, loss: torch.Tensor, hidden: torch.Tensor) -> None:
    """engine.backward(loss), plus NaN gradients when the loss is not finite (see the module docstring):
    a NaN on one element of the final hidden states' gradient reaches every layer. A finite loss adds 0.0
    to that one gradient, which changes no value, and nothing waits for the device."""
    poison = torch.where(torch.isfinite(loss.detach()), 0.0, torch.nan)
    engine.backward(loss + poison * hidden.reshape(-1)[0])


def optimizer_step(engine) -> torch.Tensor | float | None:
    """engine.step() (clip, update, schedule, zero grads), skipped when the gradients are not finite;
    returns the global gradient norm before clipping. DeepSpeed keeps none in fp32 without ZeRO, so it
    is computed here (the gradients are already all-reduced, so every rank gets the same norm)."""
    norm = None
    if _plain_fp32(engine):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        engine.optimizer.overflow = not bool(torch.isfinite(norm))
    engine.step()
    return norm if norm is not None else engine.get_global_grad_norm()


def _plain_fp32(engine) -> bool:
    return not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())


def step_applied(engine) -> bool:
    """Whether the last optimizer step updated the weights (False: skipped for non-finite gradients)."""
    return engine.was_step_applied()


def save_checkpoint(engine, checkpoints_dir: Path, tag: str) -> None:
    """Every rank must call this: each writes its own shard of `<checkpoints_dir>/<tag>/`."""
    engine.save_checkpoint(str(checkpoints_dir), tag=tag, save_latest=False)


def load_checkpoint(engine, checkpoints_dir: Path, tag: str, train: TrainConfig) -> dict[str, Any]:
    """Restore model, optimizer, scheduler (and loss scaler) from `<checkpoints_dir>/<tag>/`, then apply
    the current config's optimizer settings; returns them as read back from the optimizer."""
    path, _ = engine.load_checkpoint(str(checkpoints_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"{checkpoints_dir / tag}: DeepSpeed found no checkpoint to load in it")
    return apply_hyperparameters(engine, train)


def apply_hyperparameters(engine, train: TrainConfig) -> dict[str, Any]:
    """The current config's learning rate, schedule, weight decay, betas and epsilon on a loaded engine.

    DeepSpeed restores the optimizer's param groups and the scheduler's base learning rates from the
    checkpoint, so a value changed on resume would silently revert to the saved one. The schedule's
    shape (warmup, decay, min-lr ratio, max_steps) is the current config's already: the multiplier is
    a closure, which LambdaLR does not save. Gradient clipping comes from the DeepSpeed config the
    engine was built with. Returns the values as the optimizer now holds them."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [train.muon_lr if group.get("use_muon") else train.lr for group in groups]
    for index, (group, multiplier, peak) in enumerate(zip(groups, scheduler.lr_lambdas, scheduler.base_lrs)):
        group["initial_lr"] = peak
        group["lr"] = peak * multiplier(scheduler.last_epoch)
        if group.get("use_muon"):
            group["momentum"] = train.muon_momentum
        else:
            group["betas"] = (train.beta1, train.beta2)
            group["eps"] = train.adam_eps
        group["weight_decay"] = train.weight_decay if _decays(group, index) else 0.0
    adam = next(group for group in groups if not group.get("use_muon"))
    applied = {
        "lr": adam["lr"],
        "peak_lr": adam["initial_lr"],
        "betas": list(adam["betas"]),
        "eps": adam["eps"],
        "weight_decay": max(group["weight_decay"] for group in groups),
        "grad_clip": engine.gradient_clipping(),
    }
    muon = [group for group in groups if group.get("use_muon")]
    return applied | ({"muon_lr": muon[0]["initial_lr"], "muon_momentum": muon[0]["momentum"]} if muon else {})


def _decays(group: dict[str, Any], index: int) -> bool:
    """Whether a param group takes weight decay: its `decays` mark, or the name of the group it came from."""
    if "decays" in group:
        return group["decays"]
    return group["name"].startswith("decay-") if "name" in group else index == 0


def convert_to_universal(checkpoint: Path, out_dir: Path) -> None:
    """Write DeepSpeed's universal form of a ZeRO 1-3 checkpoint (one file per parameter and state,
    unpartitioned) to out_dir; an engine with `checkpoint.load_universal` loads it on any world size."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(checkpoint),
                output_folder=str(out_dir),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )


def current_lr(engine) -> float:
    """The learning rate of train.lr's groups (AdamW; with Muon, its AdamW half), as `train/lr` logs it."""
    groups = engine.optimizer.param_groups
    return next((group["lr"] for group in groups if not group.get("use_muon")), groups[0]["lr"])


def consolidated_state_dict(checkpoints_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """An fp32 state dict of the whole model from a checkpoint of any ZeRO stage (runs on one process,
    no process group needed): ZeRO 1-3 shards are merged by DeepSpeed's zero_to_fp32; stage 0
    checkpoints already hold the full module."""
    tag_dir = Path(checkpoints_dir) / tag
    verify_checkpoint(tag_dir)  # zero_to_fp32 unpickles with weights_only=False
    if any(tag_dir.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir), tag=tag)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {name: tensor.float() for name, tensor in states["module"].items()}


def verify_checkpoint(tag_dir: Path) -> None:
    """Refuse a checkpoint any of whose files pickles a global other than what weights_only loading
    allows plus SAFE_GLOBALS. Reads only the files' pickle records, not their tensor data."""
    allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in SAFE_GLOBALS}
    for path in sorted(Path(tag_dir).rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except Exception as exc:  # not a torch zip file at all: DeepSpeed would unpickle it blindly
            raise CheckpointError(
                f"refusing to load {path}: it is not a readable torch checkpoint ({exc}); "
                "rename this checkpoint directory (e.g. to step-N.damaged) to resume from an older one"
            ) from None
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: it pickles {', '.join(sorted(unsafe))}, which "
                "checkpoints of this pipeline never contain (a tampered or foreign file); "
                "rename this checkpoint directory (e.g. to step-N.damaged) to resume from an older one"
            )
