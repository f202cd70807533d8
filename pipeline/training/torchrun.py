"""`torchrun --nproc_per_node N -m pipeline.training --run-dir RUN_DIR --shards SHARD_DIR`.

The same per-rank training as the Ray Train path, without Ray or MLflow: rank 0 checks the shards
while the others wait, every rank trains, and rank 0 writes the result to `<run_dir>/train_result.json`
(a torchrun process has no caller to return it to). Metrics stay in the run's journal
(`<run_dir>/metrics.jsonl`); `pretrain sync RUN_DIR` sends them to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch.distributed as dist

from pipeline.errors import UserError
from pipeline.run.artifacts import atomic_write_text
from pipeline.run.guard import run_lock
from pipeline.run.rundir import TRAIN_RESULT_FILE, save_traceback
from pipeline.training.loop import train_worker
from pipeline.training.run import TrainResult


def train_and_record(run_dir: Path, shard_dir: Path) -> TrainResult:
    """Train this rank; rank 0 records the result in `<run_dir>/train_result.json`."""
    result = train_worker(run_dir, shard_dir)
    if dist.get_rank() == 0:
        atomic_write_text(run_dir / TRAIN_RESULT_FILE, json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    """Ends with destroy_process_group() and os._exit: about 1 in 20 two-rank runs otherwise aborted at
    interpreter exit ("terminate called without an active exception") while background threads were
    torn down. A user error is one line on stderr; its traceback goes to `<run_dir>/logs/`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.training", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory holding config.yaml")
    parser.add_argument("--shards", required=True, help="shard directory (holding index.json)")
    args = parser.parse_args(argv)
    run_dir, code = Path(args.run_dir), 0
    rank = int(os.environ.get("RANK", 0))
    try:
        with run_lock(run_dir) if rank == 0 else nullcontext():  # one run per run directory, as the driver
            train_and_record(run_dir, Path(args.shards))
    except UserError as exc:
        save_traceback(run_dir, f"train-rank{rank}", traceback.format_exc())
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)
