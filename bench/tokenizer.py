"""Tokenizer-stage training throughput versus HF `tokenizers` trained directly on the same sample in memory.

Corpus: bench/corpus.py's generated JSONL (--megabytes). The stage (pipeline.data.tokenizer.tokenizer_stage,
a fresh cache each time, data.num_workers=2 with Ray already started, as inside `pretrain run`) plans
the partitions, draws its sample from them in parallel, trains and saves; the direct call trains a
byte-level BPE with the same settings on the same sample, already a list in memory. The two alternate
--reps times; figures are medians, and the paired figure is the median of each repetition's
direct/stage ratio (the two runs of a repetition see the same machine load). Prints one JSON line.

    .venv/bin/python bench/tokenizer.py [--megabytes 110] [--sample-bytes 16000000] [--vocab-size 8192] [--reps 5]
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

from bench.corpus import generated_corpus  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.tokenizer import FAMILY_SPECIAL_TOKENS, sample_corpus, tokenizer_stage  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "bench-shard"  # shares bench/shard.py's generated corpus


def train_directly(texts: list[str], vocab_size: int) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
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
    parser.add_argument("--megabytes", type=float, default=110)
    parser.add_argument("--sample-bytes", type=int, default=16_000_000)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    import ray

    WORK.mkdir(exist_ok=True)
    corpus = generated_corpus(WORK / f"corpus-{args.megabytes:g}.jsonl", args.megabytes)
    overrides = [
        f"data.sources=[{{path: {corpus}}}]",
        "data.num_workers=2",
        f"tokenizer.sample_bytes={args.sample_bytes}",
        f"tokenizer.vocab_size={args.vocab_size}",
    ]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", _temp_dir=str(WORK / "ray"))
    try:
        texts = list(sample_corpus(load_config(None, overrides)))
        sample_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        stage_s, direct_s = [], []
        for _ in range(args.reps):
            with tempfile.TemporaryDirectory(dir=WORK) as workdir:
                started = time.perf_counter()
                result = tokenizer_stage(load_config(None, [f"run.workdir={workdir}", *overrides]))
                stage_s.append(time.perf_counter() - started)
                assert result.manifest["figures"]["sample_documents"] == len(texts)
            started = time.perf_counter()
            train_directly(texts, args.vocab_size)
            direct_s.append(time.perf_counter() - started)
    finally:
        ray.shutdown()
    stage, direct = statistics.median(stage_s), statistics.median(direct_s)
    print(
        json.dumps(
            {
                "bench": "tokenizer",
                "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
                "sample_mb": round(sample_mb, 3),
                "vocab_size": args.vocab_size,
                "reps": args.reps,
                "stage_mb_per_s": round(sample_mb / stage, 3),
                "direct_mb_per_s": round(sample_mb / direct, 3),
                "stage_over_direct": round(direct / stage, 3),
                "stage_over_direct_paired": round(statistics.median(d / s for d, s in zip(direct_s, stage_s)), 3),
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
