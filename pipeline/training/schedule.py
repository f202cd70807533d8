"""The learning-rate schedule: linear warmup, then cosine, linear, constant or warmup-stable-decay.

A pure function of the optimizer step and the `train` section, so the schedule a resumed or branched
run follows is always its current config's (pipeline/training/engine.py applies it after a load).
"""

from __future__ import annotations

import math

from pipeline.config import TrainConfig


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of train.lr: linear warmup over
    train.warmup_steps ((step+1)/warmup, so the first step already learns), then the decay, which
    reaches train.min_lr_ratio at train.max_steps and stays there (a resume may raise max_steps).

    - cosine, linear: from the end of warmup to max_steps;
    - constant: no decay;
    - wsd (warmup-stable-decay): the peak held until the last train.decay_fraction of max_steps, then a
      `linear` or `1-sqrt` (train.decay_shape) decay over them: the shape MiniCPM and OLMo anneal with."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    start = decay_start(train)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, train.max_steps - start))
    if train.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif train.schedule == "wsd" and train.decay_shape == "1-sqrt":
        decay = 1.0 - math.sqrt(progress)
    else:
        decay = 1.0 - progress
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * decay


def decay_start(train: TrainConfig) -> int:
    """The step the decay starts at: the end of warmup, or for WSD the start of its last decay_fraction."""
    if train.schedule != "wsd":
        return train.warmup_steps
    return max(train.warmup_steps, train.max_steps - round(train.decay_fraction * train.max_steps))
