"""Tracking: the durable local journal every run keeps, and MLflow, which the driver alone talks to.

    names.py    metric names, name/secret cleaning and the store URI; imports nothing heavy
    journal.py  the append-only local record (metrics.jsonl, mlflow_ops.jsonl) and the training sink
    local.py    where a run is tracked, the journal-only run (tracking off), environment tags,
                how a stage's figures are logged
    store.py    the MLflow run of a pipeline run: create/reopen, send the journal, sync; the only
                module of the project that imports mlflow
    compare.py  the table of an experiment's runs (`pretrain compare`)
    plot.py     the loss-curve PNG (matplotlib, imported only there)
    ui.py       starting and stopping the MLflow UI server

Training ranks import only `names` and `journal`: neither mlflow nor matplotlib loads on a rank.
This file imports nothing, so `import pipeline.tracking.names` stays light.
"""
