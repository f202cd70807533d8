"""The `pretrain sweep` subcommand."""

from __future__ import annotations

import argparse
import os

from launch import console


def add_sweep_command(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run a config over a grid or random search as Ray Tune trials under one MLflow run",
        description="Every KEY=V1,V2 is a grid axis, KEY=loguniform:LOW:HIGH (or uniform:, randint:) a range drawn "
        "--samples times, KEY=V an override shared by all trials. Each trial is a full run (<workdir>/runs/<trial>), "
        "an MLflow child run of the sweep's run; rerunning the same command skips finished trials, resumes the rest.",
    )
    sweep.add_argument("config", help="experiment YAML (see configs/)")
    sweep.add_argument("axes", nargs="*", metavar="KEY=V1,V2", help="e.g. train.lr=1e-3,3e-4 model.d_model=64,128")
    sweep.add_argument("--samples", type=int, default=1, help="random draws of the range axes (times the grid)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    sweep.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    sweep.add_argument("--early-stop", choices=["asha"], help="stop poor trials early on their in-loop val loss")
    sweep.add_argument("--fit", choices=["scaling"], help="fit L(N, D) = E + A/N^a + B/D^b to the final losses")
    sweep.add_argument("--budget-flops", type=float, help="with --fit scaling: the compute-optimal N, D at this budget")
    sweep.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.run.rundir import CONFIG_FILE, LOGS_DIR, run_dir_of
    from pipeline.sweep.driver import SweepOptions, plan_sweep, run_sweep
    from pipeline.sweep.record import sweep_dir_of

    options = SweepOptions(
        samples=args.samples,
        max_concurrent=args.max_concurrent,
        early_stop=args.early_stop,
        fit=args.fit,
        budget_flops=args.budget_flops,
        seed=args.seed,
    )
    plan = plan_sweep(args.config, args.axes, options)
    sweep_dir = sweep_dir_of(plan.base)
    console.log_to(sweep_dir / LOGS_DIR / "driver.log")
    # Ray Tune's own console output (its experiment box, trial tables and errors) goes to the log: the
    # sweep prints a line per trial event and the trials table itself.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    console.file_only("ray.tune")
    run_sweep(plan, options)
    print(f"\nsweep directory: {sweep_dir}")
    # A trial's resolved config names the store even when the command line overrode the workdir.
    first_trial = run_dir_of(next(iter(plan.configs.values())))
    print(f"open the MLflow UI: pretrain ui {first_trial / CONFIG_FILE}")
    return 0
