"""The DeepSpeed config, derived from the `train` section by one pure function (no deepspeed import).

Batch arithmetic has one owner, pipeline.config: the config arrives with micro batch, accumulation
and global batch already resolved, and this module only copies them.

Bucket sizes follow the model instead of DeepSpeed's defaults (5e8 elements for the reduce and
all-gather buckets, 5e7 for the ZeRO-3 prefetch, 1e9 live parameters). Those defaults are larger than
any model under a few billion parameters, so a whole model's gradients are flattened into one bucket
and ZeRO-3 keeps every gathered parameter alive: transient full-size copies that hide ZeRO's savings
(bench/zero_memory.py measures both settings).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from pipeline.config import TrainConfig

MAX_BUCKET = 500_000_000  # DeepSpeed's default; larger buckets only cost memory
MIN_BUCKET = 1_000_000  # below this, per-collective latency dominates


def bucket_sizes(num_parameters: int, d_model: int) -> dict[str, int]:
    """Buckets of about 1/8 of the model (clamped), so that no collective copies the whole model at
    once; ZeRO-3 prefetches ~1/16, keeps at most ~1/4 of the model gathered and keeps tensors
    smaller than 10 x d_model (norms, biases) whole on every rank, as Hugging Face's `auto` does."""
    bucket = min(MAX_BUCKET, max(MIN_BUCKET, num_parameters // 8))
    return {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": min(MAX_BUCKET, max(MIN_BUCKET, num_parameters // 16)),
        "stage3_max_live_parameters": max(MIN_BUCKET, num_parameters // 4),
        "stage3_max_reuse_distance": max(MIN_BUCKET, num_parameters // 4),
        "stage3_param_persistence_threshold": 10 * d_model,
    }


def deepspeed_config(
    train: TrainConfig,
    data_parallel_size: int,
    *,
    num_parameters: int,
    d_model: int,
    on_gpu: bool = False,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON for `train` on `data_parallel_size` ranks; `train.deepspeed` keys override it
    (a warning names each key that replaced a derived value). `load_universal`: the checkpoint to load
    is in DeepSpeed's universal format (a ZeRO checkpoint of another world size)."""
    derived = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * data_parallel_size,
        "gradient_clipping": train.grad_clip,
        "optimizer": _optimizer(train, on_gpu),
        "zero_optimization": _zero(train, num_parameters, d_model, on_gpu),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,  # the training loop does the logging
        "wall_clock_breakdown": False,
        **_precision(train.precision),
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }
    return merge_overrides(derived, train.deepspeed)


def _optimizer(train: TrainConfig, on_gpu: bool) -> dict[str, Any]:
    """AdamW; torch's implementation unless the optimizer is offloaded (then DeepSpeedCPUAdam). Or
    DeepSpeed's Muon, which tags the 2-D parameters outside embeddings and the head for Muon and runs
    torch's AdamW on the rest. Weight decay here is the default; the engine passes parameter groups that
    turn it off for norms, biases and embeddings."""
    params: dict[str, Any] = {
        "lr": train.lr,
        "betas": [train.beta1, train.beta2],
        "eps": train.adam_eps,
        "weight_decay": train.weight_decay,
    }
    if train.optimizer == "muon":
        muon = {"muon_lr": train.muon_lr, "momentum": train.muon_momentum, "torch_adam": True}
        return {"type": "Muon", "params": params | muon}
    if not train.offload_optimizer:
        params["torch_adam"] = True
        if on_gpu:
            params["fused"] = True
    return {"type": "AdamW", "params": params}


def _zero(train: TrainConfig, num_parameters: int, d_model: int, on_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 0:
        return zero
    zero |= bucket_sizes(num_parameters, d_model)
    zero |= {"overlap_comm": on_gpu, "contiguous_gradients": True}  # overlap needs CUDA streams
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # export consolidates from the shards
        if train.optimizer == "muon":
            zero["reduce_scatter"] = False  # DeepSpeed's ZeRO-3 Muon needs whole gradients to orthogonalize
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return zero


def _precision(precision: str) -> dict[str, Any]:
    """bf16/fp16 keep fp32 master weights (DeepSpeed's optimizers do), and here also accumulate gradients
    over micro-steps and reduce them across ranks in fp32, as torchtitan and OLMo-core do: bf16's 8-bit
    mantissa loses the small contributions of many micro-steps or ranks."""
    if precision == "fp32":
        return {}
    fp32_gradients = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    if precision == "bf16":
        return {"bf16": {"enabled": True}, **fp32_gradients}
    if precision == "fp16":
        # Dynamic loss scaling: start at 2^16, halve on overflow (after `hysteresis` overflows),
        # double after `loss_scale_window` clean steps.
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            },
            **fp32_gradients,
        }


def merge_overrides(derived: dict[str, Any], overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `derived`; warn once per replaced leaf value."""
    merged = copy.deepcopy(derived)
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value, prefix=f"{path}.")
            continue
        if key in merged and merged[key] != value:
            warnings.warn(f"train.deepspeed.{path}={value!r} overrides the derived value {merged[key]!r}", stacklevel=2)
        merged[key] = copy.deepcopy(value)
    return merged
