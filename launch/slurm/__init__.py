"""Slurm: `pretrain submit` and `pretrain status`, the sbatch template, sweeps, requeue and in-job helpers.

`pretrain submit CONFIG [overrides] --nodes N ...` validates the config as the job will run it (attached
to a Ray cluster inside the allocation: cluster.address=auto, workers = nodes x GPUs per node, or CPU
workers per node), writes that config and the rendered `pretrain.sbatch` into the run directory and
calls sbatch. The job starts Ray on its nodes with srun and runs `pretrain run`; on the warning signal it
asks the pipeline for a checkpoint and requeues itself, and the requeued job resumes the same run
directory (same MLflow run, exact data position).

    settings.py   SlurmSettings: defaults < site YAML ($PRETRAIN_SITE or --site) < flags
    render.py     the runs of a submission (sweeps included) and the rendered job script
    jobs.py       sbatch, the run's job record, resubmission and `pretrain status`
    commands.py   the `submit` and `status` subcommands
    job.py        helpers the script runs inside the job: `python -m launch.slurm ...`

The job script template, its README and commented examples are in the top-level slurm/ folder
(package data of the wheel).

Files:
    <run_dir>/slurm/config.yaml       the config the job runs
    <run_dir>/slurm/settings.yaml     the Slurm settings it was submitted with
    <run_dir>/slurm/job.sbatch        the rendered script (single runs)
    <run_dir>/slurm/jobs.json         every job submitted for the run: id, array task, script, log
    <run_dir>/slurm/<jobid>.out       the job's output (sweeps log to <sweep_dir>/<jobid>_<task>.out)
    <run_dir>/slurm/ray-<jobid>.json  the job's Ray nodes and where the training workers ran
    <workdir>/sweeps/<name>-<time>/   a sweep's array script and tasks.json
"""
