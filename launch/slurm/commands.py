"""The `pretrain submit` and `pretrain status` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.slurm.jobs import Submission, plan_submission, resume_tasks, saved_settings, status_lines, submit
from launch.slurm.render import prepare_runs, render_script, sweep_base
from launch.slurm.settings import FLAG_FIELDS, SITE_ENV, SlurmSettings, load_settings
from pipeline.errors import SlurmError


def add_slurm_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `submit` and `status` on the `pretrain` command's subparsers."""
    submit_parser = subparsers.add_parser(
        "submit",
        help="run the pipeline as a Slurm job (Ray inside the allocation, requeue on preemption)",
        description="Validate CONFIG for the allocation, write the rendered slurm/pretrain.sbatch into the run "
        f"directory and sbatch it. Site defaults: --site FILE or ${SITE_ENV} (a YAML of Slurm settings).",
    )
    submit_parser.add_argument("config", nargs="?", help="experiment YAML (omit with --resume)")
    submit_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-path config overrides")
    submit_parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="resubmit an unfinished run (its saved config and Slurm settings; flags override the settings)",
    )
    submit_parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one run per combination of all --sweep values, as one job array",
    )
    submit_parser.add_argument("--site", help=f"YAML of site Slurm settings (default: ${SITE_ENV})")
    submit_parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    for field, kind in FLAG_FIELDS.items():
        submit_parser.add_argument(
            f"--{field.replace('_', '-')}", dest=field, type=kind, help=SlurmSettings.model_fields[field].description
        )
    submit_parser.set_defaults(func=cmd_submit)
    status_parser = subparsers.add_parser("status", help="a run's checkpoint, Slurm job state and MLflow run")
    status_parser.add_argument("run_dir", help="the run directory (<workdir>/runs/<name>)")
    status_parser.set_defaults(func=cmd_status)


def cmd_submit(args: argparse.Namespace) -> int:
    flags = {field: getattr(args, field) for field in FLAG_FIELDS}
    if args.resume:
        if args.config or args.overrides or args.sweep:
            raise SlurmError("--resume RUN_DIR takes no CONFIG, overrides or --sweep: it reruns the saved config")
        settings = load_settings(args.site, flags, base=saved_settings(Path(args.resume)))
        tasks = resume_tasks(Path(args.resume), settings)
    elif args.config:
        settings = load_settings(args.site, flags)
        tasks = prepare_runs(args.config, args.overrides, args.sweep, settings)
    else:
        raise SlurmError("give a CONFIG to submit, or --resume RUN_DIR")
    submission = plan_submission(tasks, settings, sweep=bool(args.sweep))
    script = render_script(settings, tasks, output=submission.output, array=submission.array, chdir=Path.cwd())
    if args.dry_run:
        print(script, end="")
        return 0
    if not args.sweep:
        job_id = submit(submission, settings, script)
    else:
        job_id = submit_sweep(submission, settings, script, args.sweep)
    print("\n".join(submitted_lines(job_id, submission)))
    return 0


def submit_sweep(submission: Submission, settings: SlurmSettings, script: str, axes: list[str]) -> str:
    """A sweep's array, with the same MLflow layout as `pretrain sweep`: one run for the sweep (created
    now, in the sweep directory), and each array task's run nested under it."""
    from pipeline.sweep.space import parse_axes
    from pipeline.sweep.summary import open_sweep_run

    tasks = submission.tasks
    base = tasks[0].config.model_copy(deep=True)
    base.run.name = sweep_base(tasks)
    tracker = open_sweep_run(base, parse_axes(axes), len(tasks), submission.script_path.parent, {"slurm_array": True})
    for task in tasks:
        if tracker.run_id is not None:
            task.config.tracking.parent_run_id = tracker.run_id
    status = "FAILED"
    try:
        job_id = submit(submission, settings, script)
        tracker.set_tags({"slurm.array_job_id": job_id})
        status = "FINISHED"  # the sweep's run only groups its trials, which Slurm runs from here on
    finally:
        tracker.finish(status)
    return job_id


def submitted_lines(job_id: str, submission: Submission) -> list[str]:
    tasks = submission.tasks
    experiment = tasks[0].config.tracking.experiment
    if submission.array is None:
        log = str(submission.output).replace("%j", job_id)
        return [
            f"submitted job {job_id}: run {tasks[0].name} (MLflow experiment {experiment})",
            f"  run dir  {tasks[0].run_dir}",
            f"  script   {submission.script_path}",
            f"  log      {log}",
            f"follow it: tail -f {log}  |  squeue -j {job_id}  |  pretrain status {tasks[0].run_dir}",
        ]
    lines = [
        f"submitted array job {job_id}: {len(tasks)} runs in MLflow experiment {experiment}",
        f"  script   {submission.script_path}",
    ]
    lines += [f"  {job_id}_{index}  {task.name}  {task.run_dir}" for index, task in enumerate(tasks)]
    logs = str(submission.output).replace("%A", job_id).replace("%a", "*")
    return lines + [f"follow it: tail -f {logs}  |  squeue -j {job_id}  |  pretrain status RUN_DIR"]


def cmd_status(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(Path(args.run_dir))))
    return 0
