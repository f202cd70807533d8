"""`pretrain plan`: parameters, FLOPs per token and memory per GPU before anything runs.

Model-state memory follows the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3): with
mixed-precision Adam each parameter costs 2 bytes of 16-bit weights, 2 of 16-bit gradients and
K=12 of optimizer state (fp32 master weights, momentum, variance). In fp32 there is no master
copy: 4 + 4 + 8. ZeRO-1 partitions the optimizer state over the data-parallel ranks, ZeRO-2 also
the gradients, ZeRO-3 also the weights. Offloaded states live in host memory instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models import activation_memory_bytes, flops_per_token, num_parameters
from pipeline.config import Config
from pipeline.training.modeling import meta_model, model_config

GIB = 1024**3


@dataclass(frozen=True)
class StageMemory:
    stage: int
    params: float  # bytes per GPU
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def bytes_per_parameter(precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter for Adam."""
    return (4, 4, 8) if precision == "fp32" else (2, 2, 12)


def checkpoint_bytes(n_params: int, precision: str, zero_stage: int) -> int:
    """Bytes of one checkpoint over all ranks: weights plus optimizer state. ZeRO 1-3 also save their
    fp32 partitions of the weights, which in fp32 are a second copy (bf16/fp16 count them in the
    optimizer's 12 bytes already)."""
    weights, _, optimizer = bytes_per_parameter(precision)
    master_copy = 4 if precision == "fp32" and zero_stage >= 1 else 0
    return n_params * (weights + optimizer + master_copy)


def model_state_memory(
    n_params: int, precision: str, dp_size: int, *, offload_optimizer: bool = False, offload_params: bool = False
) -> list[StageMemory]:
    """Per-GPU bytes of weights, gradients and optimizer state for ZeRO stages 0-3."""
    weights, grads, optimizer = (n_params * b for b in bytes_per_parameter(precision))
    rows = []
    for stage in range(4):
        rows.append(
            StageMemory(
                stage=stage,
                params=0.0 if offload_params and stage == 3 else weights / (dp_size if stage >= 3 else 1),
                grads=grads / (dp_size if stage >= 2 else 1),
                optimizer=0.0 if offload_optimizer and stage >= 1 else optimizer / (dp_size if stage >= 1 else 1),
            )
        )
    return rows


def checkpointed_activation_bytes(cfg, micro_batch: int, seq_len: int, value_bytes: int) -> int:
    """With activation checkpointing each block keeps only its input; one block's full activations
    live again while it is recomputed in backward, and the head's are kept as before."""
    head = activation_memory_bytes(dataclasses.replace(cfg, n_layers=0), micro_batch, seq_len, value_bytes)
    one_layer = activation_memory_bytes(dataclasses.replace(cfg, n_layers=1), micro_batch, seq_len, value_bytes) - head
    block_inputs = cfg.n_layers * micro_batch * seq_len * cfg.d_model * value_bytes
    return head + one_layer + block_inputs


def make_plan(config: Config) -> dict:
    """Everything `pretrain plan` prints, as a dict (also what `--json` prints)."""
    cfg = model_config(config)
    model = meta_model(config)
    n_params = num_parameters(model)
    t = config.train
    value_bytes = 4 if t.precision == "fp32" else 2
    activations = activation_memory_bytes(cfg, t.micro_batch_size, t.seq_len, value_bytes)
    checkpointed = checkpointed_activation_bytes(cfg, t.micro_batch_size, t.seq_len, value_bytes)
    return {
        "family": cfg.family,
        "params": n_params,
        "non_embedding_params": num_parameters(model, exclude_embeddings=True),
        "flops_per_token": flops_per_token(cfg, t.seq_len),
        "data_parallel_size": config.data_parallel_size,
        "precision": t.precision,
        "micro_batch_size": t.micro_batch_size,
        "seq_len": t.seq_len,
        "zero_stage": t.zero_stage,
        "model_states": model_state_memory(
            n_params,
            t.precision,
            config.data_parallel_size,
            offload_optimizer=t.offload_optimizer,
            offload_params=t.offload_params,
        ),
        "activation_bytes": activations,
        "checkpointed_activation_bytes": checkpointed,
        "activation_checkpointing": t.activation_checkpointing,
        "checkpoint_bytes": checkpoint_bytes(n_params, t.precision, t.zero_stage),
        "flops_per_step": flops_per_token(cfg, t.seq_len) * t.global_batch_size * t.seq_len,
    }


def format_plan(plan: dict) -> str:
    """The plan as a short human-readable report with a per-stage memory table."""
    lines = [
        f"model             {plan['family']}, {plan['params']:,} parameters "
        f"({plan['non_embedding_params']:,} without embeddings)",
        f"FLOPs per token   {plan['flops_per_token']:.3e} (6N + 12 * layers * d_model * seq_len, training)",
        f"FLOPs per step    {plan['flops_per_step']:.3e}",
        f"setup             {plan['data_parallel_size']} data-parallel ranks, {plan['precision']}, "
        f"micro-batch {plan['micro_batch_size']} x seq_len {plan['seq_len']}",
        "",
        "model-state memory per GPU (GiB)",
        "ZeRO  weights    grads      optimizer  total",
    ]
    for row in plan["model_states"]:
        marker = "  <- configured" if row.stage == plan["zero_stage"] else ""
        lines.append(
            f"{row.stage:<5} {row.params / GIB:<10.3f} {row.grads / GIB:<10.3f} "
            f"{row.optimizer / GIB:<10.3f} {row.total / GIB:.3f}{marker}"
        )
    configured = plan["model_states"][plan["zero_stage"]].total
    activations = plan["checkpointed_activation_bytes" if plan["activation_checkpointing"] else "activation_bytes"]
    lines += [
        "",
        f"activations per micro-batch   {plan['activation_bytes'] / GIB:.3f} GiB without recomputation, "
        f"{plan['checkpointed_activation_bytes'] / GIB:.3f} GiB with activation checkpointing",
        f"estimated peak per GPU        {(configured + activations) / GIB:.3f} GiB "
        "(configured ZeRO stage + activations, before allocator overhead)",
        f"checkpoint size (all ranks)   {plan['checkpoint_bytes'] / GIB:.3f} GiB (weights + optimizer state)",
    ]
    return "\n".join(lines)
