"""The run layer: what a pipeline run is made of, below the stages and above them.

    artifacts.py    stage outputs: atomic writes, fingerprints, the content-addressed cache, manifests
    runtime.py      the accelerator, the distributed backend and the one Ray connection; Ray tasks
    rundir.py       the run directory: every file name in it, the stage record (run.json)
    orchestrate.py  `pretrain run`: the stages in order, one MLflow run, stop and resume

artifacts, runtime and rundir sit below data, training, eval and tracking (they import only config
and errors); orchestrate sits above them all and is the only module here that starts stages.
"""
