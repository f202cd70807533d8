"""`pretrain sweep`: many runs of one config as Ray Tune trials under one MLflow run.

    space.py    grid and random axes, the trials and their names (pure: no Ray)
    driver.py   plan (validate every trial) and run a sweep: data once, trials, resume by rerunning
    trials.py   the Ray Tune side: one Trainable per trial running the whole pipeline, ASHA
    record.py   the sweep directory, sweep.json (each trial's state), the trials table rows
    summary.py  the sweep's MLflow run: params, trials table, best trial, plots, the fit's figures
    scaling.py  the scaling-law fit L(N, D) = E + A/N^alpha + B/D^beta and the compute-optimal N, D

A sweep sits beside run/orchestrate.py: each trial is one `run_pipeline`.
"""
