"""Helpers the rendered job script runs inside the job: `python -m launch.slurm HELPER ...`.

wait-ray           wait until every node joined the job's Ray cluster, or fail naming why
ray-summary        write the Ray nodes and the nodes the training workers ran on, as JSON
latest-checkpoint  print the tag of the run's latest complete checkpoint (empty without one)
wait-checkpoint    wait until the latest checkpoint moves past a tag, or the pipeline exits
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.errors import SlurmError
from pipeline.run.artifacts import atomic_write_json
from pipeline.training.checkpoint import checkpoints_dir, is_complete, latest_pointer


def wait_for_ray_nodes(expected: int, timeout_s: float, watch_pids: list[int]) -> str:
    """Wait until `expected` nodes of the job's Ray ($RAY_ADDRESS) are alive; fail when a watched srun (the
    Ray head or workers) exits or the timeout passes. ray.init blocks without a timeout on a dead head, so
    the Ray side runs in a daemon thread that a failure abandons. Returns a one-line summary."""
    progress: dict[str, Any] = {"alive": 0}
    watcher = threading.Thread(target=_count_ray_nodes, args=(expected, progress), daemon=True)
    started = time.monotonic()
    watcher.start()
    while watcher.is_alive():
        watcher.join(timeout=1)
        exited = [pid for pid in watch_pids if not _pid_running(pid)]
        waited = time.monotonic() - started
        if watcher.is_alive() and (exited or waited > timeout_s):
            why = (
                f"the srun of a Ray node (pid {exited[0]}) exited; see its output above"
                if exited
                else f"not within {timeout_s:.0f} s"
            )
            raise SlurmError(
                f"only {progress['alive']} of {expected} nodes joined the Ray cluster at "
                f"{os.environ.get('RAY_ADDRESS', 'auto')}: {why}"
            )
    if "error" in progress:
        raise SlurmError(f"attaching to the Ray cluster failed: {progress['error']}")
    return (
        f"Ray cluster ready at {os.environ.get('RAY_ADDRESS', 'auto')}: {progress['alive']} nodes, "
        f"{progress['cpus']:g} CPUs, {progress['gpus']:g} GPUs after {time.monotonic() - started:.1f} s"
    )


def _count_ray_nodes(expected: int, progress: dict[str, Any]) -> None:
    import ray

    try:
        ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
        while True:
            progress["alive"] = sum(1 for node in ray.nodes() if node["Alive"])
            if progress["alive"] >= expected:
                break
            time.sleep(1)
        resources = ray.cluster_resources()
        progress.update(cpus=resources.get("CPU", 0), gpus=resources.get("GPU", 0))
        ray.shutdown()
    except Exception as exc:  # reported by the waiting thread
        progress["error"] = f"{type(exc).__name__}: {exc}"


def _pid_running(pid: int) -> bool:
    """Alive and not a zombie (an exited srun stays a zombie until the batch script reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ray_summary() -> dict[str, Any]:
    """The job's Ray nodes and the nodes its Ray Train workers ran on (from the GCS actor table, which
    keeps finished actors; the state API would need the dashboard)."""
    import ray
    from ray._private.state import actors

    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
    try:
        nodes = [
            {
                "node_id": n["NodeID"],
                "ip": n["NodeManagerAddress"],
                "alive": n["Alive"],
                "cpus": n["Resources"].get("CPU", 0),
                "gpus": n["Resources"].get("GPU", 0),
            }
            for n in ray.nodes()
        ]
        workers = [
            {"node_id": a["Address"]["NodeID"], "pid": a["Pid"], "state": a["State"]}
            for a in actors().values()
            if a["ActorClassName"] == "RayTrainWorker"
        ]
    finally:
        ray.shutdown()
    return {"job_id": os.environ.get("SLURM_JOB_ID"), "nodes": nodes, "train_workers": workers}


def wait_for_checkpoint(run_dir: Path, after: str | None, timeout_s: float, pid: int) -> str:
    """Until `latest` names a complete checkpoint other than `after`, the process `pid` (the pipeline)
    exits, or the timeout passes; returns "written", "exited" or "timeout"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if latest_checkpoint(run_dir) not in (None, after):
            return "written"
        if not _pid_running(pid):
            return "exited"
        time.sleep(1)
    return "timeout"


def latest_checkpoint(run_dir: Path) -> str | None:
    tag = latest_pointer(run_dir)
    return tag if tag and is_complete(checkpoints_dir(run_dir) / tag) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.slurm", description="Helpers of the rendered sbatch script, run inside the job."
    )
    helpers = parser.add_subparsers(dest="helper", required=True)
    wait = helpers.add_parser("wait-ray", help="wait until every node joined the job's Ray cluster")
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, required=True)
    wait.add_argument("--watch", type=int, nargs="*", default=[], help="srun pids whose exit means failure")
    summary = helpers.add_parser("ray-summary", help="write the Ray nodes and training workers' nodes as JSON")
    summary.add_argument("--out", required=True)
    latest = helpers.add_parser("latest-checkpoint", help="print the run's latest complete checkpoint tag")
    latest.add_argument("run_dir", type=Path)
    written = helpers.add_parser(
        "wait-checkpoint",
        help="wait for a checkpoint newer than --after; prints written, exited (the pipeline ended) or timeout",
    )
    written.add_argument("run_dir", type=Path)
    written.add_argument("--after", default="")
    written.add_argument("--timeout", type=float, required=True)
    written.add_argument("--pid", type=int, required=True, help="the pipeline's pid")
    args = parser.parse_args(argv)
    try:
        if args.helper == "wait-ray":
            print(wait_for_ray_nodes(args.nodes, args.timeout, args.watch), flush=True)
        elif args.helper == "ray-summary":
            atomic_write_json(args.out, ray_summary())
        elif args.helper == "latest-checkpoint":
            print(latest_checkpoint(args.run_dir) or "")
        else:
            print(wait_for_checkpoint(args.run_dir, args.after or None, args.timeout, args.pid))
    except SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)  # a thread may still block in ray.init; a normal exit would wait for Ray's shutdown hooks
    return 0
