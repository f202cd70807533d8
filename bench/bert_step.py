"""Forward + backward time of a bert-base-shape masked LM (12 x 768, vocab 30,522) on the CPU, the old way
against the new, side by side in one process:

- old: the loader's all-ones attention_mask (a dense (B, 1, T, T) mask, so no flash kernel) and the MLM
  head over every position, cross-entropy over the ~15% masked ones;
- new: no mask (packed windows have no padding) and the head over the masked positions only
  (models.bert.BERT.forward with labels).

Masking as in training (15% of positions). Steps alternate between the two ways after one warm-up
each; the figure is the median seconds per step. The loss of both ways is reported too (equal up to
summation order). Prints one JSON line.

    .venv/bin/python bench/bert_step.py [--steps 5] [--micro-batch 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import BERT, TransformerConfig  # noqa: E402

BERT_BASE = dict(
    family="bert", vocab_size=30522, max_seq_len=512, d_model=768, n_layers=12, n_heads=12, norm_position="post"
)


def old_step(model, inputs, labels) -> float:
    logits = model(inputs, attention_mask=torch.ones_like(inputs)).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.item()


def new_step(model, inputs, labels) -> float:
    loss = model(inputs, labels=labels).loss
    loss.backward()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = BERT(TransformerConfig(**BERT_BASE))
    inputs = torch.randint(5, BERT_BASE["vocab_size"], (args.micro_batch, args.seq_len))
    labels = torch.where(torch.rand(inputs.shape) < 0.15, inputs, -100)
    ways = {"old": old_step, "new": new_step}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    losses = {}
    for step in range(args.steps + 1):
        for name, way in ways.items():
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            losses[name] = way(model, inputs, labels)
            if step:  # the first round warms up
                seconds[name].append(time.perf_counter() - started)
    median = {name: round(statistics.median(values), 3) for name, values in seconds.items()}
    print(
        json.dumps(
            {
                "model": "bert-base shape",
                "micro_batch": args.micro_batch,
                "seq_len": args.seq_len,
                "steps": args.steps,
                "seconds_per_step": median,
                "speedup": round(median["old"] / median["new"], 3),
                "loss": {name: round(value, 5) for name, value in losses.items()},
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
