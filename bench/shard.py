"""Shard-stage throughput per worker against raw `tokenizers` encoding, scaling from 1 to 2 workers,
the driver's CPU cost, and peak memory of the driver and of a worker at 1x and 4x corpus size.

Corpus: bench/corpus.py's generated JSONL (the stdlib, copied), --megabytes big (at least 100).
The tokenizer (--vocab-size) is trained once beforehand. Each repetition runs, side by side:
  - the shard stage (pipeline.data.shard.shard_stage, a fresh cache each time) with data.num_workers=1
    (in the driver process) and with 2 (one Ray task per partition; Ray already started, as inside
    `pretrain run`), recording its tokens/s and the driver's CPU seconds;
  - raw `Tokenizer.encode`, one document at a time on one thread, over every 8th document (the corpus
    is uniform), the rate a worker would reach if reading, splitting and writing cost nothing.
Per-worker figures are stage tokens/s / workers / raw tokens/s. Medians over --reps.
Memory: two child processes (fresh driver, fresh Ray, 2 workers) shard --megabytes/4 and
--megabytes; each reports the driver's peak RSS and the largest worker peak RSS.
Prints one JSON line.

    .venv/bin/python bench/shard.py [--megabytes 110] [--reps 3] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus import generated_corpus  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.readers import source_texts  # noqa: E402
from pipeline.data.shard import shard_stage  # noqa: E402
from pipeline.data.tokenizer import load_tokenizer, tokenizer_stage  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "bench-shard"


def settings(corpus: Path, workdir: Path, vocab_size: int, workers: int) -> list[str]:
    return [
        f"run.workdir={workdir}",
        f"data.sources=[{{path: {corpus}}}]",
        f"data.num_workers={workers}",
        f"tokenizer.vocab_size={vocab_size}",
        "tokenizer.sample_bytes=8000000",
    ]


def timed_stage(corpus: Path, tokenizer, vocab_size: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as workdir:
        config = load_config(None, settings(corpus, Path(workdir), vocab_size, workers))
        started, cpu = time.perf_counter(), time.process_time()
        figures = shard_stage(config, tokenizer).manifest["figures"]
        return {
            "seconds": time.perf_counter() - started,
            "tokens": figures["tokens"],
            "driver_cpu_s": time.process_time() - cpu,
            "partitions": figures["partitions"],
        }


def raw_encode(tokenizer_dir: Path, texts: list[str]) -> dict:
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.encode_special_tokens = True
    started = time.perf_counter()
    tokens = sum(len(tokenizer.encode(t).ids) + 1 for t in texts)  # +1: the separator
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def rate(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def memory_run(corpus: Path, workdir: Path, vocab_size: int) -> dict:
    """In a child process: shard `corpus` with 2 workers (its tokenizer already cached in workdir); the
    driver's peak RSS and the largest worker peak RSS."""
    import ray

    config = load_config(None, settings(corpus, workdir, vocab_size, 2))
    tokenizer = tokenizer_stage(config)
    assert tokenizer.reused, "the parent trains the tokenizer, so the driver's peak is the shard stage's"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", _temp_dir=str(WORK / "ray"))
    try:
        figures = shard_stage(config, tokenizer).manifest["figures"]
    finally:
        ray.shutdown()
    return {
        "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
        "tokens": figures["tokens"],
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mb": figures["worker_peak_rss_mb"],
    }


def memory_figures(megabytes: float, vocab_size: int) -> dict:
    runs = {}
    for name, size in (("1x", megabytes / 4), ("4x", megabytes)):
        corpus = generated_corpus(WORK / f"corpus-{size:g}.jsonl", size)
        with tempfile.TemporaryDirectory(dir=WORK) as workdir:
            tokenizer_stage(load_config(None, settings(corpus, Path(workdir), vocab_size, 1)))
            command = [sys.executable, __file__, "--memory-run", str(corpus), workdir, "--vocab-size", str(vocab_size)]
            runs[name] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return runs


def main() -> None:
    sys.stdout = sys.stderr  # the stages' progress lines; only the JSON line goes to stdout
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=110)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--memory-run", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    if args.memory_run:
        print(json.dumps(memory_run(*args.memory_run, args.vocab_size)), file=sys.__stdout__)
        return
    import ray

    corpus = generated_corpus(WORK / f"corpus-{args.megabytes:g}.jsonl", args.megabytes)
    with tempfile.TemporaryDirectory(dir=WORK) as workdir:
        config = load_config(None, settings(corpus, Path(workdir), args.vocab_size, 1))
        tokenizer = tokenizer_stage(config)
        texts = list(source_texts(0, config.data))[::8]
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", _temp_dir=str(WORK / "ray"))
        try:
            runs = {"1": [], "2": [], "raw": []}
            for _ in range(args.reps):
                runs["1"].append(timed_stage(corpus, tokenizer, args.vocab_size, 1))
                runs["2"].append(timed_stage(corpus, tokenizer, args.vocab_size, 2))
                runs["raw"].append(raw_encode(tokenizer.path, texts))
        finally:
            ray.shutdown()
    print(json.dumps(summary(args, corpus, runs, memory_figures(args.megabytes, args.vocab_size))), file=sys.__stdout__)


def summary(args, corpus: Path, runs: dict, memory: dict) -> dict:
    raw = statistics.median(rate(r) for r in runs["raw"])
    one, two = (statistics.median(rate(r) for r in runs[k]) for k in ("1", "2"))
    driver_cpu_per_m = statistics.median(r["driver_cpu_s"] / r["tokens"] * 1e6 for r in runs["2"])
    ceiling = 1e6 / driver_cpu_per_m
    return {
        "bench": "shard",
        "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
        "tokens": runs["1"][0]["tokens"],
        "partitions": runs["1"][0]["partitions"],
        "vocab_size": args.vocab_size,
        "reps": args.reps,
        "raw_encode_tokens_per_s": round(raw),
        "workers_1_tokens_per_s": round(one),
        "workers_2_tokens_per_s": round(two),
        "per_worker_over_raw_1": round(one / raw, 3),
        "per_worker_over_raw_2": round(two / 2 / raw, 3),
        "scaling_2_over_1": round(two / one, 3),
        "driver_cpu_s_per_m_tokens": round(driver_cpu_per_m, 4),
        "driver_ceiling_tokens_per_s": round(ceiling),
        "driver_ceiling_cores": round(ceiling / raw, 1),
        "memory": memory,
        "seconds": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


if __name__ == "__main__":
    main()
