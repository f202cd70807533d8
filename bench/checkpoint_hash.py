"""What self-verifying checkpoints cost: hashing a checkpoint's files (rank 0, after the save barrier,
before COMPLETE) against writing them with torch.save, side by side on the same files.

The files are a gpt2-124m-sized fp32 checkpoint: weights plus two Adam moments (--params, default
124M parameters, 3 x 4 bytes each, about 1.5 GB), written with torch.save as one model-states file and
one optimizer file. --reps alternations of (write, hash); figures are medians, and the ratio is the
median of each repetition's hash/write. Prints one JSON line.

    .venv/bin/python bench/checkpoint_hash.py [--params 124000000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.training.checkpoint import file_digests  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=124_000_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    weights = torch.randn(args.params)
    moments = {"exp_avg": torch.randn(args.params), "exp_avg_sq": torch.rand(args.params)}
    writes, hashes = [], []
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as scratch:
        directory = Path(scratch)
        for _ in range(args.reps):
            started = time.perf_counter()
            torch.save({"module": weights}, directory / "mp_rank_00_model_states.pt")
            torch.save(moments, directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            digests = file_digests(directory)
            hashes.append(time.perf_counter() - started)
        total = sum(d["bytes"] for d in digests.values())
    print(
        json.dumps(
            {
                "bench": "checkpoint_hash",
                "checkpoint_bytes": total,
                "write_s_median": round(statistics.median(writes), 3),
                "hash_s_median": round(statistics.median(hashes), 3),
                "hash_mb_per_s": round(total / 1e6 / statistics.median(hashes), 1),
                "hash_over_write_median": round(statistics.median(h / w for h, w in zip(hashes, writes)), 3),
                "reps": args.reps,
            }
        )
    )


if __name__ == "__main__":
    main()
