#!/bin/bash
# A multi-node GPT-2 (124M) run: 4 nodes x 8 GPUs = 32 training workers (ZeRO-1, bf16).
#
# What `pretrain submit` does with this:
#   - validates configs/gpt2-124m.yaml with cluster.address=auto and cluster.num_workers=32 (the batch
#     triple is derived again for 32 ranks), so a bad config fails here, not on the cluster;
#   - writes <workdir>/runs/gpt2-124m/slurm/{config.yaml,settings.yaml,job.sbatch} and calls sbatch;
#   - the job starts Ray on its 4 nodes, runs `pretrain run` attached to it, and on the warning signal
#     checkpoints and requeues itself; the requeued job resumes the same run and MLflow run.
# Watch it with `pretrain status work/runs/gpt2-124m`; continue a stopped run with
# `pretrain submit --resume work/runs/gpt2-124m`.
set -euo pipefail
pretrain submit configs/gpt2-124m.yaml \
  train.precision=bf16 tracking.uri=http://mlflow.internal:5000 \
  --nodes 4 --gpus-per-node 8 --time 24:00:00 \
  --site slurm/examples/site.yaml "$@"
