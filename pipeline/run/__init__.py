"""The run layer: what a pipeline run is made of, below the stages and above them.

    artifacts.py    stage outputs: atomic writes, fingerprints, the content-addressed cache, manifests
    runtime.py      the accelerator, the distributed backend and the one Ray connection; Ray tasks
    rundir.py       the run directory: every file name in it, the stage record (run.json)
    guard.py        one run per run directory (a lock) and a write probe
    orchestrate.py  `pretrain run`: the stages in order, one MLflow run, stop and resume
    branch.py       `pretrain branch`: a new run from another run's checkpoint

artifacts, runtime and rundir sit below data, training, eval and tracking (they import only config
and errors); orchestrate and branch sit above them all, and orchestrate is the only module here that
starts stages.
"""
