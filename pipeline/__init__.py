"""The pipeline behind `pretrain run`: config, run layer, data, training, evaluation, tracking.

    errors.py   UserError and its subclasses (a leaf: no project imports)
    config/     the typed experiment config (no torch, deepspeed or ray)
    run/        artifacts and cache, runtime (Ray, accelerator), run directory, orchestration
    data/       sources, partitions, tokenizer and shard stages, shard format, loader, masking
    training/   the DeepSpeed loop, its callbacks, the checkpoint manager, Ray Train and torchrun entries
    eval/       the eval stage, lm-eval harness, HF export
    tracking/   the local journal and MLflow (the only mlflow import is tracking/store.py)

Lower layers never import higher ones: errors <- config <- run.{artifacts,runtime,rundir} <- data,
tracking, training, eval <- run.orchestrate <- launch.
"""
