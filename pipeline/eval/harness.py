"""lm-evaluation-harness on an exported causal LM, offline, in a child process.

The harness needs process-wide settings: the hub libraries' offline switches (read once, at import)
and, for local task YAMLs whose `dataset_kwargs.data_files` are relative, the working directory. A
child process gets them without changing the caller's process: `run_lm_eval` starts
`python -m pipeline.eval.harness` with HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 and the include directory
as its cwd, and reads back the scores. A problem the user can fix comes back as the same UserError.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.errors import ConfigError, ExportError, UserError

_USER_ERROR_EXIT = 2
_ERRORS = {"ConfigError": ConfigError, "ExportError": ExportError}


def run_lm_eval(
    export_dir: str | Path,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Score an exported causal LM with lm-evaluation-harness, offline: {task: {metric: value}}.

    Tasks come from lm-eval's built-in YAMLs (their datasets must be in the HF datasets cache) or from
    `include_path`, a directory of task YAMLs; `dataset_kwargs.data_files` in those resolve against
    that directory. `limit` caps the documents per task (a count, or a fraction below 1)."""
    export_dir = Path(export_dir).resolve()
    check_causal_export(export_dir)
    include_dir = Path(include_path).resolve() if include_path is not None else None
    if include_dir is not None and not include_dir.is_dir():
        raise ConfigError(f"{include_path}: the lm-eval include path must be a directory of task YAML files")
    with tempfile.TemporaryDirectory(prefix="pretrain-lm-eval-") as scratch:
        out = Path(scratch) / "scores.json"
        command = [
            sys.executable,
            "-m",
            "pipeline.eval.harness",
            str(export_dir),
            "--out",
            str(out),
            "--batch-size",
            str(batch_size),
            "--tasks",
            *tasks,
        ]
        command += ["--include", str(include_dir)] if include_dir else []
        command += ["--limit", str(limit)] if limit is not None else []
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [_project_root(), os.environ.get("PYTHONPATH")])),
        }
        done = subprocess.run(command, cwd=include_dir or scratch, env=env, capture_output=True, text=True)
        if done.returncode == _USER_ERROR_EXIT:
            kind, _, message = done.stderr.strip().splitlines()[-1].partition(": ")
            raise _ERRORS.get(kind, UserError)(message)
        if done.returncode:
            raise RuntimeError(f"lm-evaluation-harness failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def check_causal_export(export_dir: Path) -> None:
    config_file = export_dir / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{export_dir}: no config.json; export the run first (`pretrain export RUN_DIR`)")
    architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    if not any(name.endswith("ForCausalLM") or name.endswith("LMHeadModel") for name in architectures):
        raise ExportError(
            f"{config_file}: lm-eval scores causal LMs, this is {architectures}; run lm-eval on a model.family=gpt run"
        )


def lm_eval_task_manager(tasks: list[str], include_dir: Path | None):
    """Index only the include directory when it holds every task: indexing lm-eval's ~15k built-in
    task YAMLs takes tens of seconds on a small machine."""
    from lm_eval.tasks import TaskManager

    if include_dir is not None:
        local = TaskManager(include_path=str(include_dir), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=str(include_dir) if include_dir else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"lm-eval tasks {unknown} are unknown; check the names (`lm-eval ls tasks`) or pass "
            "the directory of their task YAML as the include path"
        )
    return manager


def lm_eval_scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's results; "acc,none" becomes "acc" (no filter),
    non-numeric entries (aliases, "N/A" stderrs) are dropped; "samples" is the documents scored."""
    scores = {}
    for task, values in results["results"].items():
        task_scores = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and isinstance(value, (int, float)) and not isinstance(value, bool):
                task_scores[metric if filter_name == "none" else key] = float(value)
        if task in results.get("n-samples", {}):
            task_scores["samples"] = results["n-samples"][task]["effective"]
        scores[task] = task_scores
    return scores


def main(argv: list[str] | None = None) -> int:
    """The child process: score, write the scores JSON; a user error is its last stderr line."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.harness")
    parser.add_argument("export_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--include")
    parser.add_argument("--limit", type=float)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        import lm_eval
    except ImportError:
        print(
            "ConfigError: lm-eval is not installed; install the eval extra: pip install -e '.[eval]'", file=sys.stderr
        )
        return _USER_ERROR_EXIT
    import torch

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        manager = lm_eval_task_manager(args.tasks, Path(args.include) if args.include else None)
    except UserError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return _USER_ERROR_EXIT
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": args.export_dir, "dtype": "float32"},
        tasks=list(args.tasks),
        task_manager=manager,
        device="cuda" if torch.cuda.is_available() else "cpu",
        batch_size=args.batch_size,
        limit=limit,
        log_samples=False,
    )
    Path(args.out).write_text(json.dumps(lm_eval_scores(results)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
