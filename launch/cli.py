"""The `pretrain` command. Each subcommand imports its heavy dependencies lazily, so
`pretrain config check` answers in well under a second."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, config_reference_markdown, dump_config, load_config

STAGES = ("tokenizer", "shard", "train", "eval")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dot-path overrides, e.g. train.lr=3e-4 model.n_layers=2")


def _load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args)
    t = config.train
    print(f"{args.config}: ok ({config.model.family}, {config.model.n_layers} layers x d_model "
          f"{config.model.d_model}; global batch {t.global_batch_size} = {t.micro_batch_size} x "
          f"{t.grad_accum_steps} x {config.cluster.num_workers} workers; {t.max_steps} steps)")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    print(config_reference_markdown(), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.plan import format_plan, make_plan

    plan = make_plan(_load(args))
    if args.json:
        plan["model_states"] = [dataclasses.asdict(row) for row in plan["model_states"]]
        print(json.dumps(plan))
    else:
        print(format_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain", description="Pretrain GPT and BERT models: tokenizer -> shards -> DeepSpeed "
        "training -> evaluation, orchestrated by Ray and tracked in MLflow.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="show, check or document experiment configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the fully resolved config as YAML")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    check = config_commands.add_parser("check", help="validate a config; exit non-zero with the problem")
    _add_config_args(check)
    check.set_defaults(func=cmd_config_check)
    reference = config_commands.add_parser("reference", help="print every config key with its description")
    reference.set_defaults(func=cmd_config_reference)

    plan = commands.add_parser("plan", help="parameters, FLOPs per token and memory per GPU under ZeRO 0-3")
    _add_config_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_nvidia_gpu() else "cuda")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia").exists()


if __name__ == "__main__":
    sys.exit(main())
