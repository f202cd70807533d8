"""Peak memory of one forward + backward of gpt2-124m at micro-batch 8 x 1024 on the CPU, with the loss
computed the old way (the whole (B, T, vocab) logits, cast to fp32, then cross-entropy) and the new way
(models.layers.chunked_cross_entropy: chunks of the hidden states scored and recomputed in backward).

Each variant runs in its own fresh process (so one's peak cannot hide the other's), alternating, and
reports its peak RSS (ru_maxrss) above the RSS it had after building the model and the batch; the
figures are medians over --rounds. Also the logits' own size in fp32, the term the new way removes, and
the loss of both ways (equal up to summation order). Prints one JSON line.

    .venv/bin/python bench/loss_memory.py [--rounds 1] [--micro-batch 8] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPT2_124M = dict(family="gpt", vocab_size=50304, max_seq_len=1024, d_model=768, n_layers=12, n_heads=12)


def measure(variant: str, micro_batch: int, seq_len: int) -> dict:
    """In this process: build, one forward + backward, peak RSS above the post-build RSS (KiB -> GiB)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from models import GPT, TransformerConfig

    torch.manual_seed(0)
    model = GPT(TransformerConfig(**GPT2_124M))
    ids = torch.randint(0, GPT2_124M["vocab_size"], (micro_batch, seq_len + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "whole_logits":
        logits = model(inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    else:
        loss = model(inputs, labels=labels).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_above_build_gib": round((peak - before) / 2**20, 3), "loss": round(loss.item(), 5)}


def run_variant(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--micro-batch", str(args.micro_batch)]
    done = subprocess.run([*command, "--seq-len", str(args.seq_len)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--child", choices=["whole_logits", "chunked"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.micro_batch, args.seq_len)))
        return
    runs = {"whole_logits": [], "chunked": []}
    for _ in range(args.rounds):
        for variant in runs:
            runs[variant].append(run_variant(variant, args))
    peak = {v: statistics.median(r["peak_above_build_gib"] for r in results) for v, results in runs.items()}
    logits_gib = args.micro_batch * args.seq_len * GPT2_124M["vocab_size"] * 4 / 2**30
    print(
        json.dumps(
            {
                "model": "gpt2-124m",
                "micro_batch": args.micro_batch,
                "seq_len": args.seq_len,
                "rounds": args.rounds,
                "peak_above_build_gib": peak,
                "saved_gib": round(peak["whole_logits"] - peak["chunked"], 3),
                "fp32_logits_gib": round(logits_gib, 3),
                "loss": {v: results[0]["loss"] for v, results in runs.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
