"""Document masking and torch.compile on the demo: quality and CPU throughput, side by side.

Runs `pretrain run configs/gpt-tiny.yaml` (the built-in corpus, 2 ZeRO-1 CPU workers) in one workdir,
so the tokenizer and shards are built once and every variant trains the same steps on the same data:
- masked: train.document_masking=true (the default), eager;
- unmasked: train.document_masking=false, eager;
- masked_compiled: document masking with train.compile=true (inductor on the CPU).
For each: the eval stage's validation loss and bits per byte (same validation windows; each run
evaluated with its own attention rule), the train stage's tokens/s over the whole run (the first
step's compile time included), and the median tokens/s of the logged windows after the first (steady
state: what compile buys once compiled). Those runs follow one another, so their throughputs differ
with the machine's load as much as with the setting; the cost of masking itself is measured side by
side: the gpt-tiny model's forward and backward on the same windows, with the document mask and with
plain causal attention, alternating in rounds (the median of the rounds' paired ratios). One JSON line.

    .venv/bin/python bench/masking.py [--steps 300] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.tracking.journal import read_metrics  # noqa: E402

VARIANTS = {
    "masked": ["train.document_masking=true"],
    "unmasked": ["train.document_masking=false"],
    "masked_compiled": ["train.document_masking=true", "train.compile=true"],
}


def run_variant(workdir: Path, name: str, overrides: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "launch.cli",
        "run",
        "configs/gpt-tiny.yaml",
        f"run.workdir={workdir}",
        f"run.name={name}",
        "tracking.enabled=false",
        *overrides,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stages = json.loads((workdir / "runs" / name / "run.json").read_text())["stages"]
    report = json.loads((workdir / "runs" / name / "eval" / "report.json").read_text())
    train = stages["train"]["figures"]
    metrics = read_metrics(workdir / "runs" / name / "metrics.jsonl")
    windows = [r["metrics"]["train/tokens_per_s"] for r in metrics if "train/tokens_per_s" in r["metrics"]]
    return {
        "val_loss": round(report["metrics"]["val_loss"], 4),
        "bits_per_byte": round(report["metrics"]["bits_per_byte"], 4),
        "train_loss": round(train["train_loss"], 4),
        "tokens_per_s": round(train["tokens_per_s"], 1),
        "steady_tokens_per_s": round(statistics.median(windows[1:]), 1),
        "train_seconds": train["train_seconds"],
        "graph_breaks": train.get("graph_breaks"),
    }


def masking_cost(rounds: int = 9, steps: int = 10) -> float:
    """Paired ratio, masked over causal, of forward+backward time on gpt-tiny's shape (8 x 128 tokens),
    documents of 40 tokens (so every window holds boundaries); the first round is warm-up."""
    import torch

    from pipeline.config import load_config
    from pipeline.training.modeling import build_model

    torch.manual_seed(0)
    model = build_model(load_config(REPO / "configs" / "gpt-tiny.yaml"))
    ids = torch.randint(10, 4000, (8, 128))
    documents = torch.arange(128).div(40, rounding_mode="floor").expand(8, 128)

    def seconds(document_ids) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            model(ids, labels=ids, document_ids=document_ids).loss.backward()
        return time.perf_counter() - started

    paired = [seconds(None) / seconds(documents) for _ in range(rounds)][1:]
    return round(statistics.median(paired), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-masking-") as tmp:
        common = [f"train.max_steps={args.steps}", *args.overrides]
        results = {name: run_variant(Path(tmp), name, [*overrides, *common]) for name, overrides in VARIANTS.items()}
    masked, unmasked, compiled = (results[name] for name in VARIANTS)
    print(
        json.dumps(
            {
                "bench": "masking",
                "config": "configs/gpt-tiny.yaml",
                "steps": args.steps,
                "variants": results,
                "masking_throughput_ratio_runs": round(masked["tokens_per_s"] / unmasked["tokens_per_s"], 3),
                "masking_throughput_ratio_paired": masking_cost(),
                "compile_speedup_whole_run": round(compiled["tokens_per_s"] / masked["tokens_per_s"], 3),
                "compile_speedup_steady": round(compiled["steady_tokens_per_s"] / masked["steady_tokens_per_s"], 3),
                "val_loss_masked_minus_unmasked": round(masked["val_loss"] - unmasked["val_loss"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
