#!/bin/bash
# A sweep as one Slurm job array: every combination of the --sweep values is one array task and one run
# (its own run directory and MLflow run), here 3 learning rates x 2 widths = 6 tasks, at most 3 at once.
#
# Run names extend the config's with the swept values (gpt-tiny-lr0.003-d_model128, ...); the array
# script and tasks.json land in <workdir>/sweeps/<name>-<time>/, each task logs to <jobid>_<task>.out.
# Each task is preempted and requeued like a single run.
set -euo pipefail
pretrain submit configs/gpt-tiny.yaml train.max_steps=2000 \
  --sweep train.lr=3e-3,1e-3,3e-4 --sweep model.d_model=128,256 \
  --nodes 1 --gpus-per-node 1 --array-parallel 3 --time 02:00:00 "$@"
