"""Training metrics: loss, grad norm, throughput, MFU and memory over a logging window."""

from __future__ import annotations

import os
import re
import resource
import time
from typing import Any

import torch
import torch.distributed as dist

from pipeline.tracking.names import METRIC_SKIPPED_STEPS, METRIC_TOKENS_PER_S, METRIC_TOKENS_SEEN, METRIC_TRAIN_LOSS

GIB = 1024**3

# Dense bf16/fp16 tensor-core peak FLOP/s of one GPU (vendor data sheets, without sparsity), matched
# against torch.cuda.get_device_name in this order. A hard-coded A100 figure gave "104% MFU" on H100s.
GPU_PEAK_FLOPS = (
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"\b(H100|H200|GH200|H800)\b", 989e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"\bA30\b", 165e12),
    (r"\bV100\b", 125e12),
    (r"\bT4\b", 65e12),
    (r"\bMI300X\b", 1307e12),
    (r"\bMI250X?\b", 383e12),
)


def peak_flops_per_device(configured: float | None, device: torch.device) -> float | None:
    """train.peak_flops if set, else the table entry for this GPU; None when unknown (MFU not logged)."""
    if configured is not None or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((flops for pattern, flops in GPU_PEAK_FLOPS if re.search(pattern, name)), None)


class Meter:
    """The steps since the last log line. Step times exclude evaluation and checkpoints; on GPU the
    window ends with the loss sync, whose wait counts."""

    def __init__(
        self,
        *,
        tokens_per_step: int,
        world_size: int,
        flops_per_token: int,
        peak_flops: float | None,
        device: torch.device,
    ):
        self.tokens_per_step, self.world_size, self.device = tokens_per_step, world_size, device
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
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

    def flush(self, *, tokens_seen: int, skipped_steps: int) -> dict[str, float | None]:
        """Metrics of the window (one all-reduce for the loss), then start a new window."""
        steps, started = self.window_steps, time.perf_counter()
        window_loss = None
        if self.losses:  # every rank skips the same steps, so all or none join this all-reduce
            loss = torch.stack(self.losses).sum()
            dist.all_reduce(loss)
            window_loss = self.last_loss = loss.item() / (len(self.losses) * self.world_size)
        seconds = self.window_seconds + time.perf_counter() - started
        self.total_seconds, self.total_steps = self.total_seconds + seconds, self.total_steps + steps
        tokens_per_s = steps * self.tokens_per_step / seconds
        metrics = {
            METRIC_TRAIN_LOSS: window_loss,
            "train/lr": self.lr,
            METRIC_SKIPPED_STEPS: skipped_steps,
            "train/grad_norm": None if self.grad_norm is None else float(self.grad_norm),
            METRIC_TOKENS_PER_S: tokens_per_s,
            METRIC_TOKENS_SEEN: tokens_seen,
            "train/mfu": self.mfu(tokens_per_s),
            "train/step_time_s": seconds / steps,
            **memory_metrics(self.device),
        }
        self.losses, self.grad_norm, self.window_steps, self.window_seconds = [], None, 0, 0.0
        return metrics

    def summary(self) -> dict[str, Any]:
        tokens_per_s = self.total_steps * self.tokens_per_step / self.total_seconds if self.total_steps else None
        return {
            "train_loss": self.last_loss,
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s) if tokens_per_s else None,
            "train_seconds": round(self.total_seconds, 3),
        }

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilization: achieved training FLOP/s over the peak of all devices."""
        if self.peak_flops is None:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size)


def compilation_figures() -> dict[str, int]:
    """What torch.compile did in this process: the graphs it compiled and the graph breaks it hit (a
    break splits the model into pieces run eagerly in between, the usual way compile silently loses)."""
    from torch._dynamo.utils import counters

    return {
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def memory_metrics(device: torch.device) -> dict[str, float]:
    """GPU: allocated and peak allocated; CPU: resident set size now and at its peak (this rank)."""
    if device.type == "cuda":
        return {
            "train/memory_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
            "train/memory_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
        }
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {
        "train/rss_gib": rss / GIB,
        "train/rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
