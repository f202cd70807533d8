"""Shard-stage throughput with 1 and 2 workers on the same corpus, and versus plain `encode_batch`.

Two corpora: the stdlib (builtin:python-stdlib, about 12 MB) and the stdlib repeated --repeat times
as one JSONL file (each copy marked, so copies are distinct documents), where Ray's fixed start-up
cost (about 2 s to start the actor pool) weighs less. The tokenizer is trained once beforehand.
Each repetition times the shard stage's work (pipeline.shard.write_shards: read, hash-split,
tokenize, sort, write, checksum) with data.num_workers=1 (in-process) and 2 (Ray Data actor pool,
Ray already started, as inside `pretrain run`), then one `Tokenizer.encode_batch` call over the
same documents held in memory (which HF tokenizers parallelizes over all cores). Figures are
medians over --reps repetitions. Prints one JSON line.

    .venv/bin/python bench/shard.py [--reps 3] [--repeat 4] [--vocab-size 4096]
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

from pipeline.config import load_config  # noqa: E402
from pipeline.shard import write_shards  # noqa: E402
from pipeline.sources import iter_corpus  # noqa: E402
from pipeline.tokenizer import load_tokenizer, tokenizer_stage  # noqa: E402


def timed_shards(config, tokenizer, workers: int) -> tuple[float, int]:
    config = config.model_copy(deep=True)
    config.data.num_workers = workers
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        figures = write_shards(config, tokenizer.path, tokenizer.fingerprint, Path(out))
        return time.perf_counter() - started, figures["tokens"]


def timed_encode_batch(tokenizer_dir: Path, texts: list[str]) -> tuple[float, int]:
    tokenizer = load_tokenizer(tokenizer_dir)
    started = time.perf_counter()
    encodings = tokenizer.encode_batch(texts)
    return time.perf_counter() - started, sum(len(e.ids) + 1 for e in encodings)  # +1: separator


def repeated_corpus(texts: list[str], copies: int, path: Path) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for copy in range(copies):
            for text in texts:
                handle.write(json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n")
    return path


def measure(config, tokenizer, reps: int) -> dict:
    texts = [d.text for d in iter_corpus(config.data)]
    runs = {"1": [], "2": [], "encode_batch": []}
    for _ in range(reps):
        runs["1"].append(timed_shards(config, tokenizer, 1))
        runs["2"].append(timed_shards(config, tokenizer, 2))
        runs["encode_batch"].append(timed_encode_batch(tokenizer.path, texts))
    rates = {name: statistics.median(tokens / seconds for seconds, tokens in values) for name, values in runs.items()}
    return {
        "documents": len(texts),
        "corpus_mb": round(sum(len(t.encode()) for t in texts) / 1e6, 3),
        "tokens": runs["1"][0][1],
        "workers_1_tokens_per_s": round(rates["1"]),
        "workers_2_tokens_per_s": round(rates["2"]),
        "scaling_2_over_1": round(rates["2"] / rates["1"], 3),
        "encode_batch_tokens_per_s": round(rates["encode_batch"]),
        "workers_2_over_encode_batch": round(rates["2"] / rates["encode_batch"], 3),
        "seconds": {name: [round(s, 2) for s, _ in values] for name, values in runs.items()},
    }


def main() -> None:
    sys.stdout = sys.stderr  # the stages' progress lines; only the JSON line goes to stdout
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as workdir:
        settings = [
            f"run.workdir={workdir}",
            f"tokenizer.vocab_size={args.vocab_size}",
            "tokenizer.sample_bytes=4000000",
        ]
        stdlib = load_config(None, settings)
        tokenizer = tokenizer_stage(stdlib)
        jsonl = repeated_corpus([d.text for d in iter_corpus(stdlib.data)], args.repeat, Path(workdir) / "x.jsonl")
        repeated = load_config(None, [*settings, f"data.sources=[{{path: {jsonl}}}]"])
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _temp_dir=f"{workdir}/ray")
        ray_init_s = time.perf_counter() - started
        try:
            figures = {
                "stdlib": measure(stdlib, tokenizer, args.reps),
                f"stdlib_x{args.repeat}": measure(repeated, tokenizer, args.reps),
            }
        finally:
            ray.shutdown()
    print(
        json.dumps(
            {
                "bench": "shard",
                "vocab_size": args.vocab_size,
                "reps": args.reps,
                **figures,
                "ray_init_s": round(ray_init_s, 2),
                "cpus": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
            }
        ),
        file=sys.__stdout__,
    )


if __name__ == "__main__":
    main()
