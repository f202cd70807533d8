"""Derived values: the vocabulary size, seq_len, the batch triple and the step budget.

One owner for the batch arithmetic: global_batch = micro_batch x grad_accum x data-parallel size. Any
two may be given; the third is derived and all three are checked. The functions take the root config
(pipeline/config/schema.py calls them from its validator) and raise ValueError with the message that
names the keys and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.config.base import check
from pipeline.config.sections import TrainConfig

# The functions take the root Config (pipeline/config/schema.py, which calls them from its validator);
# typed as Any so that this module does not import its caller.
Config = Any

# The keys `resolve_derived` fills in when they are left unset.
DERIVABLE = {
    "model": ("vocab_size",),
    "train": ("seq_len", "micro_batch_size", "grad_accum_steps", "global_batch_size", "max_steps"),
}


def unset_derivable_keys(config: Config) -> set[str]:
    """The dotted DERIVABLE keys the user left unset (a dumped config writes them back as unset)."""
    return {
        f"{section}.{key}"
        for section, keys in DERIVABLE.items()
        for key in keys
        if getattr(getattr(config, section), key) is None
    }


def resolve_derived(config: Config) -> None:
    """Fill derived values (vocab size, seq_len, batch triple, steps) in place and check they agree."""
    m, t = config.model, config.train
    if m.vocab_size is None:
        m.vocab_size = math.ceil(config.tokenizer.vocab_size / m.pad_vocab_multiple) * m.pad_vocab_multiple
    check(
        m.vocab_size >= config.tokenizer.vocab_size,
        f"model.vocab_size={m.vocab_size} is smaller than "
        f"tokenizer.vocab_size={config.tokenizer.vocab_size}; raise it or leave it unset",
    )
    t.seq_len = t.seq_len or m.max_seq_len
    check(t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    resolve_batch(t, config.cluster.num_workers)
    resolve_budget(t)


def resolve_budget(t: TrainConfig) -> None:
    """max_steps from max_tokens (or the default of 1000 steps), checked against warmup."""
    tokens_per_step = t.global_batch_size * t.seq_len
    check(
        t.max_tokens is None or t.max_tokens >= tokens_per_step,
        f"train.max_tokens={t.max_tokens} is "
        f"less than one optimizer step ({tokens_per_step} tokens = global batch x seq_len); raise it",
    )
    if t.max_steps is not None and t.max_tokens is not None:
        check(
            t.max_tokens // tokens_per_step == t.max_steps,
            f"train.max_steps={t.max_steps} and "
            f"train.max_tokens={t.max_tokens} disagree ({tokens_per_step} tokens per step); give one",
        )
    t.max_steps = t.max_steps or max(1, (t.max_tokens or 1000 * tokens_per_step) // tokens_per_step)
    check(t.warmup_steps <= t.max_steps, f"train.warmup_steps={t.warmup_steps} exceeds train.max_steps={t.max_steps}")
    decay_steps = round(t.decay_fraction * t.max_steps)
    check(
        t.schedule != "wsd" or t.warmup_steps + decay_steps <= t.max_steps,
        f"train.warmup_steps={t.warmup_steps} and the WSD decay ({decay_steps} steps, train.decay_fraction="
        f"{t.decay_fraction} of train.max_steps={t.max_steps}) overlap; lower one of them or raise train.max_steps",
    )


def resolve_batch(t: TrainConfig, dp: int) -> None:
    """global = micro x accum x data-parallel size: any two given, the third derived and checked."""
    micro, accum, glob = t.micro_batch_size, t.grad_accum_steps, t.global_batch_size
    if glob is None:
        micro, accum = micro or 8, accum or 1
    elif micro is None or accum is None:
        accum = accum or (1 if micro is None else None)
        known, per_rank_parts = (accum, "grad_accum_steps") if micro is None else (micro, "micro_batch_size")
        check(
            glob % (known * dp) == 0,
            f"train.global_batch_size={glob} is not divisible by "
            f"train.{per_rank_parts}={known} x cluster.num_workers={dp}; pick a multiple of {known * dp}",
        )
        micro, accum = (glob // (accum * dp), accum) if micro is None else (micro, glob // (micro * dp))
    product = micro * accum * dp
    check(
        glob is None or glob == product,
        f"train.global_batch_size={glob} must equal "
        f"train.micro_batch_size={micro} x train.grad_accum_steps={accum} x cluster.num_workers={dp} "
        f"= {product}; change one of them or leave one unset",
    )
    t.micro_batch_size, t.grad_accum_steps, t.global_batch_size = micro, accum, product
