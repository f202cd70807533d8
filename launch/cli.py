"""The `pretrain` command. Each subcommand imports its heavy dependencies lazily, so
`pretrain config check` answers in well under a second."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from launch import console
from launch.slurm.commands import add_slurm_commands
from launch.sweep import add_sweep_command
from pipeline.config import config_reference_markdown, dump_config, load_config
from pipeline.errors import RunStopped, StorageError, UserError
from pipeline.run.guard import writable_run_dir
from pipeline.run.rundir import (
    CONFIG_FILE,
    EVAL_DIR,
    LOGS_DIR,
    STAGES,
    SUMMARY_FILE,
    absolute_paths,
    config_path,
    run_dir_of,
)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dot-path overrides, e.g. train.lr=3e-4 model.n_layers=2"
    )


def _load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args)
    t = config.train
    print(
        f"{args.config}: ok ({config.model.family}, {config.model.n_layers} layers x d_model "
        f"{config.model.d_model}; global batch {t.global_batch_size} = {t.micro_batch_size} x "
        f"{t.grad_accum_steps} x {config.cluster.num_workers} workers; {t.max_steps} steps)"
    )
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    print(config_reference_markdown(), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.training.plan import format_plan, make_plan

    plan = make_plan(_load(args))
    if args.json:
        plan["model_states"] = [dataclasses.asdict(row) for row in plan["model_states"]]
        print(json.dumps(plan))
    else:
        print(format_plan(plan))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    _print_run_summary(config, _run(config, only=args.only, from_stage=args.from_stage))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _run(_load(args), until="train")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    config = load_config(config_path(Path(args.run_dir)), args.overrides)
    _print_run_summary(config, _run(config))
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    from pipeline.run.branch import prepare_branch

    config = prepare_branch(Path(args.run_dir), args.new_name, args.checkpoint, args.overrides)
    _print_run_summary(config, _run(config))
    return 0


def _run(config, **stages) -> dict:
    """The pipeline, with the library log in the run's logs/driver.log."""
    from pipeline.run.orchestrate import run_pipeline

    run_dir = writable_run_dir(run_dir_of(absolute_paths(config)))  # a read-only workdir: one line, nothing written
    console.log_to(run_dir / LOGS_DIR / "driver.log")
    return run_pipeline(config, **stages)


def _print_run_summary(config, results: dict) -> None:
    run_dir = run_dir_of(absolute_paths(config))
    summary = run_dir / EVAL_DIR / SUMMARY_FILE
    if "eval" in results and summary.is_file():
        print(summary.read_text(encoding="utf-8"), end="")
    print(f"\nrun directory: {run_dir}")
    # The run's resolved config names the store even when the command line overrode the workdir.
    print(f"open the MLflow UI: pretrain ui {run_dir / CONFIG_FILE}")


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from pipeline.data.tokenizer import tokenizer_stage

    result = tokenizer_stage(_load(args))
    print(f"tokenizer: {result.path}{' (reused)' if result.reused else ''}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from pipeline.data.inspect import inspect_shards
    from pipeline.data.shard import shard_stage

    result = shard_stage(_load(args))
    print(f"shards: {result.path}{' (reused)' if result.reused else ''}")
    print(inspect_shards(result.path))
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from pipeline.data.inspect import inspect_shards

    print(inspect_shards(args.shard_dir))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.run.orchestrate import evaluate_existing_run

    run_dir = Path(args.run_dir)
    tasks = [task for item in args.lm_eval for task in item.split(",") if task] if args.lm_eval else None
    evaluate_existing_run(
        run_dir,
        args.checkpoint,
        args.overrides,
        lm_eval_tasks=tasks,
        lm_eval_include=args.lm_eval_include,
        lm_eval_limit=args.lm_eval_limit,
    )
    print((run_dir / EVAL_DIR / SUMMARY_FILE).read_text(encoding="utf-8"), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.eval.export import export_hf

    run_dir = Path(args.run_dir)
    out = export_hf(load_config(config_path(run_dir)), run_dir, Path(args.out), args.checkpoint)
    print(f"exported {run_dir} to {out} (Hugging Face format)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.tracking.compare import compare_runs, format_table

    source = load_config(args.config) if args.config else (args.uri or _default_uri())
    print(format_table(compare_runs(source, args.experiment, sort_by=args.sort)))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from pipeline.tracking.compare import experiments_url
    from pipeline.tracking.names import tracking_uri
    from pipeline.tracking.ui import start_ui, stop_ui

    uri = tracking_uri(load_config(args.config)) if args.config else (args.uri or _default_uri())
    log_path = Path(tempfile.gettempdir()) / f"pretrain-ui-{args.port}.log"
    process, url = start_ui(uri, args.port, log_path)
    print(f"MLflow UI for {uri}: {experiments_url(url)}  (log: {log_path}; Ctrl-C stops it)", flush=True)
    if process is None:
        return 0
    try:
        process.wait()
    except KeyboardInterrupt:
        stop_ui(process)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from pipeline.tracking.store import sync_run

    sent = sync_run(Path(args.run_dir), uri=args.uri)
    print(f"sent {sent} metric values from {args.run_dir}")
    return 0


def _default_uri() -> str:
    from pipeline.tracking.names import tracking_uri

    return tracking_uri(load_config(None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Pretrain GPT and BERT models: tokenizer -> shards -> DeepSpeed "
        "training -> evaluation, orchestrated by Ray and tracked in MLflow.",
    )
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
    _add_stage_commands(commands)
    _add_run_dir_commands(commands)
    _add_tracking_commands(commands)
    add_sweep_command(commands)
    add_slurm_commands(commands)
    return parser


def _add_stage_commands(commands) -> None:
    run = commands.add_parser("run", help="run the pipeline: tokenizer -> shard -> train -> eval")
    _add_config_args(run)
    run.add_argument("--only", choices=STAGES, help="run just this stage (earlier ones must be done)")
    run.add_argument("--from", dest="from_stage", choices=STAGES, help="start at this stage")
    run.set_defaults(func=cmd_run)
    for name, func, text in (
        ("tokenizer", cmd_tokenizer, "train (or reuse) the BPE tokenizer"),
        ("shard", cmd_shard, "tokenize and pack the corpus into shards"),
        ("train", cmd_train, "train (resuming the run if it has a checkpoint)"),
    ):
        stage = commands.add_parser(name, help=text)
        _add_config_args(stage)
        stage.set_defaults(func=func)
    data = commands.add_parser("data", help="look at shard directories")
    inspect = data.add_subparsers(dest="data_command", required=True, metavar="ACTION").add_parser(
        "inspect", help="documents, tokens, bytes per token, validation share, shard sizes"
    )
    inspect.add_argument("shard_dir")
    inspect.set_defaults(func=cmd_data_inspect)


def _add_run_dir_commands(commands) -> None:
    resume = commands.add_parser("resume", help="continue an unfinished run from its run directory")
    resume.add_argument("run_dir")
    resume.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="safe changes, e.g. train.max_steps")
    resume.set_defaults(func=cmd_resume)
    branch = commands.add_parser("branch", help="a new run from another run's checkpoint (decay early, anneal)")
    branch.add_argument("run_dir", help="the parent run's directory")
    branch.add_argument("new_name", help="the branch's run.name (a new run in the same workdir)")
    branch.add_argument("--checkpoint", required=True, help="the parent's checkpoint tag, e.g. step-00000600")
    branch.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="schedule, max_steps/max_tokens, lr, data.sources"
    )
    branch.set_defaults(func=cmd_branch)
    evaluate = commands.add_parser("eval", help="evaluate a run's checkpoint (loss, perplexity, bits/byte)")
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "overrides", nargs="*", metavar="eval.KEY=VALUE", help="eval section changes, e.g. eval.max_windows=1024"
    )
    evaluate.add_argument("--checkpoint", help="checkpoint tag (default: latest)")
    evaluate.add_argument(
        "--lm-eval", nargs="+", metavar="TASKS", help="lm-evaluation-harness tasks (space or comma separated)"
    )
    evaluate.add_argument("--lm-eval-include", help="directory of local lm-eval task YAML files")
    evaluate.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task")
    evaluate.set_defaults(func=cmd_eval)
    export = commands.add_parser("export", help="write a Hugging Face model directory from a checkpoint")
    export.add_argument("run_dir")
    export.add_argument("out")
    export.add_argument("--format", choices=["hf"], default="hf")
    export.add_argument("--checkpoint", help="checkpoint tag (default: latest)")
    export.set_defaults(func=cmd_export)


def _add_tracking_commands(commands) -> None:
    compare = commands.add_parser("compare", help="a table of an experiment's runs from MLflow")
    compare.add_argument("experiment", nargs="?", help="MLflow experiment (default: the config's)")
    compare.add_argument("--config", help="take the tracking store and experiment from this config")
    compare.add_argument("--uri", help="MLflow tracking URI (default: sqlite in ./work)")
    compare.add_argument("--sort", default="val_loss", help="column to sort by; prefix - to reverse")
    compare.set_defaults(func=cmd_compare)
    ui = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1 and print its URL")
    ui.add_argument("config", nargs="?", help="take the tracking store from this config")
    ui.add_argument("--uri", help="MLflow tracking URI")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    sync = commands.add_parser("sync", help="send metrics a tracking outage kept locally to MLflow")
    sync.add_argument("run_dir")
    sync.add_argument("--uri", help="send to this store instead of the run's own")
    sync.set_defaults(func=cmd_sync)


def main(argv: list[str] | None = None) -> int:
    console.setup()
    args = parse_arguments(build_parser(), argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error ends in one line; the traceback goes to a file
        return _report_error(exc)


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with KEY=VALUE overrides accepted after options too (`branch RUN NEW --checkpoint
    TAG train.lr=1e-4`): argparse stops filling a positional list once an option has followed it."""
    args, unknown = parser.parse_known_args(argv)
    positional = "axes" if hasattr(args, "axes") else "overrides"
    if unknown and hasattr(args, positional) and all("=" in item and not item.startswith("-") for item in unknown):
        setattr(args, positional, [*getattr(args, positional), *unknown])
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _report_error(exc: Exception) -> int:
    if isinstance(exc, RunStopped) and exc.interrupted:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    exc = storage_error(exc) or exc
    if isinstance(exc, UserError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", prefix="pretrain-error-", suffix=".txt", delete=False) as log:
        traceback.print_exception(exc, file=log)
    print(f"error: {exc} (traceback: {log.name})", file=sys.stderr)
    return 1


def storage_error(exc: Exception) -> StorageError | None:
    """A full, read-only or unwritable filesystem met outside the checks that name it (the driver's own
    records, the journal): the same one line as a StorageError, with the path and the fix."""
    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return None
    path = Path(exc.filename or ".")
    where = path if path.exists() else path.parent
    free = shutil.disk_usage(where).free if where.exists() else 0
    return StorageError(
        f"writing {path} failed ({exc.strerror}; {free:,} bytes free there); free space or make it writable, or "
        "set run.workdir to another filesystem, then rerun the command: runs resume from their last checkpoint"
    )


if __name__ == "__main__":
    sys.exit(main())
