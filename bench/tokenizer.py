"""Tokenizer-stage training throughput versus calling HF `tokenizers` directly on the same text.

Both train a byte-level BPE with the same settings on the same sample (the stdlib corpus, capped at
--sample-bytes), alternately, --reps times; figures are medians. The stage's time includes reading
the sources through `datasets`, the train/val hash, the progress bar and saving; the direct call
gets the sample as an in-memory list. Prints one JSON line.

    .venv/bin/python bench/tokenizer.py [--sample-bytes 8000000] [--vocab-size 4096] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.tokenizer import FAMILY_SPECIAL_TOKENS, sample_corpus, tokenizer_stage  # noqa: E402


def train_directly(texts: list[str], vocab_size: int) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=FAMILY_SPECIAL_TOKENS["gpt"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)


def main() -> None:
    sys.stdout = sys.stderr  # the stages' progress lines; only the JSON line goes to stdout
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-bytes", type=int, default=8_000_000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    overrides = [f"tokenizer.sample_bytes={args.sample_bytes}", f"tokenizer.vocab_size={args.vocab_size}"]
    texts = list(sample_corpus(load_config(None, overrides).data, args.sample_bytes))
    sample_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    stage_s, direct_s = [], []
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory() as workdir:
            started = time.perf_counter()
            result = tokenizer_stage(load_config(None, [f"run.workdir={workdir}", *overrides]))
            stage_s.append(time.perf_counter() - started)
            assert result.manifest["figures"]["sample_bytes"] == int(sample_mb * 1e6 + 0.5)
        started = time.perf_counter()
        train_directly(texts, args.vocab_size)
        direct_s.append(time.perf_counter() - started)
    stage, direct = statistics.median(stage_s), statistics.median(direct_s)
    print(
        json.dumps(
            {
                "bench": "tokenizer",
                "sample_mb": round(sample_mb, 3),
                "vocab_size": args.vocab_size,
                "reps": args.reps,
                "stage_mb_per_s": round(sample_mb / stage, 3),
                "direct_mb_per_s": round(sample_mb / direct, 3),
                "stage_over_direct": round(direct / stage, 3),
                "stage_s": [round(s, 2) for s in stage_s],
                "direct_s": [round(s, 2) for s in direct_s],
                "cpus": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
            }
        ),
        file=sys.__stdout__,
    )


if __name__ == "__main__":
    main()
