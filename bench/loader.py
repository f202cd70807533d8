"""Shard-loader throughput versus what training consumes, and its memory as the dataset grows 10x.

1. Loader: tokens/s of GPT micro-batches of random windows (shuffled epoch) in one process, at the
   shape of configs/gpt-tiny.yaml (micro-batch 8 x seq_len 128) and at 8 x 1024.
2. Training: tokens/s of forward + backward + AdamW step of the gpt-tiny model on the same machine,
   one process (a rank of the train stage consumes at most this much; DeepSpeed adds overhead).
3. Memory: a fresh process per dataset size (N and 10 N tokens of synthetic shards) opens the
   dataset, draws --batches random batches, and reports its RSS split into anonymous memory (what
   the loader allocates) and file-backed pages (shard pages mapped around the windows it touched:
   page cache the kernel can drop at any time; fault-around maps 64 KiB per touched page), plus the
   size of the epoch's sample table (8 bytes per window, the one part that grows with the data).
Figures are medians of --reps repetitions. Prints one JSON line.

    .venv/bin/python bench/loader.py [--tokens 20000000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.loader import BatchLoader, TokenDataset  # noqa: E402
from pipeline.data.partitions import Partition  # noqa: E402
from pipeline.data.shard_index import ShardWriter  # noqa: E402
from pipeline.data.shards import INDEX_FILE, INDEX_FORMAT_VERSION, SHARD_TOKENIZER_DIR  # noqa: E402
from pipeline.run.artifacts import atomic_write_json  # noqa: E402

VOCAB = 4096
CHUNK_TOKENS = 1 << 22


def synthetic_shards(directory: Path, tokens: int) -> Path:
    """Random tokens in the real shard format (one source, train split only)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    partition = Partition(0, 0, "synthetic", (), "train", tokens)
    writer = ShardWriter(directory, "train", partition, "uint16", shard_tokens=16 * CHUNK_TOKENS)
    for start in range(0, tokens, CHUNK_TOKENS):
        chunk = rng.integers(0, VOCAB, size=min(CHUNK_TOKENS, tokens - start), dtype=np.uint16)
        writer.add(chunk.tobytes(), source_bytes=3 * len(chunk))
    empty = ShardWriter(directory, "val", partition, "uint16", shard_tokens=1).finish()
    (directory / SHARD_TOKENIZER_DIR).mkdir()  # no tokenizer made these ids: nothing for index.json to hash
    index = {
        "format_version": INDEX_FORMAT_VERSION,
        "family": "gpt",
        "vocab_size": VOCAB,
        "dtype": "uint16",
        "tokenizer_fingerprint": "synthetic",
        "separator_id": 0,
        "splits": {"train": writer.finish(), "val": empty},
        "sources": [{"name": "synthetic", "weight": 1.0}],
    }
    atomic_write_json(directory / INDEX_FILE, index)
    return directory


def loader_tokens_per_s(shard_dir: Path, micro_batch: int, seq_len: int, seconds: float = 3.0) -> float:
    loader = BatchLoader(
        TokenDataset(shard_dir),
        family="gpt",
        seq_len=seq_len,
        micro_batch_size=micro_batch,
        rank=0,
        world_size=1,
        seed=0,
    )
    loader.next_batch()  # builds the epoch's permutation outside the timing
    batches, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loader.next_batch()
        batches += 1
    return batches * micro_batch * seq_len / (time.perf_counter() - started)


def training_tokens_per_s(steps: int = 6) -> float:
    import torch

    from pipeline.training.modeling import build_model

    config = load_config(REPO / "configs" / "gpt-tiny.yaml")
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, seq_len = config.train.micro_batch_size, config.train.seq_len
    ids = torch.randint(0, config.model.vocab_size, (batch, seq_len + 1))
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - started)
    return batch * seq_len / statistics.median(timings[1:])


MEMORY_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[3])
from pipeline.data.loader import BatchLoader, TokenDataset
loader = BatchLoader(TokenDataset(sys.argv[1]), family="gpt", seq_len=128, micro_batch_size=8, rank=0,
                     world_size=1, seed=0)
for _ in range(int(sys.argv[2])):
    loader.next_batch()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kib = lambda key: int(status[key].split()[0])
print(json.dumps({"rss_mb": kib("VmRSS") / 1024, "rss_anon_mb": kib("RssAnon") / 1024,
                  "rss_file_mb": kib("RssFile") / 1024, "table_mb": loader._epoch_table().nbytes / 2**20}))
"""


def memory(shard_dir: Path, batches: int) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(shard_dir), str(batches), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000, help="N; the large dataset has 10 N")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2000, help="random batches drawn by the memory probe")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as root:
        small = synthetic_shards(Path(root) / "small", args.tokens)
        large = synthetic_shards(Path(root) / "large", 10 * args.tokens)
        loader_128 = statistics.median(loader_tokens_per_s(large, 8, 128) for _ in range(args.reps))
        loader_1024 = statistics.median(loader_tokens_per_s(large, 8, 1024) for _ in range(args.reps))
        training = statistics.median(training_tokens_per_s() for _ in range(args.reps))
        memories = {
            name: [memory(path, args.batches) for _ in range(args.reps)]
            for name, path in (("small", small), ("large", large))
        }
    medians = {
        name: {key: round(statistics.median(m[key] for m in runs), 1) for key in runs[0]}
        for name, runs in memories.items()
    }
    print(
        json.dumps(
            {
                "bench": "loader",
                "tokens_small": args.tokens,
                "tokens_large": 10 * args.tokens,
                "reps": args.reps,
                "loader_tokens_per_s_8x128": round(loader_128),
                "loader_tokens_per_s_8x1024": round(loader_1024),
                "training_tokens_per_s_gpt_tiny": round(training),
                "loader_over_training": round(loader_128 / training, 1),
                "memory_small": medians["small"],
                "memory_large": medians["large"],
                "rss_anon_growth_mb_for_10x_data": round(
                    medians["large"]["rss_anon_mb"] - medians["small"]["rss_anon_mb"], 1
                ),
                "cpus": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
