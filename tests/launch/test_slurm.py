"""Fast tests of `pretrain submit` / `pretrain status` without a Slurm cluster: rendering, dry runs, site
settings, sweep arrays (the axes themselves: tests/pipeline/sweep/test_space.py), and submission against
stand-in `sbatch` and `scontrol` executables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from launch.slurm.render import render_template, template_text
from launch.slurm.settings import SlurmSettings, load_settings
from pipeline.config import load_config
from pipeline.errors import SlurmError

REPO = Path(__file__).resolve().parents[2]
GPT_TINY = str(REPO / "configs" / "gpt-tiny.yaml")


def pretrain(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run the commands from a scratch directory with no site file in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRETRAIN_SITE", raising=False)
    return tmp_path / "work"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """`sbatch` that records its script and answers job 4242; `scontrol` reporting the state in STATE."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {bin_dir}/sbatch.calls\necho "4242;cluster"\n')
    (bin_dir / "scontrol").write_text(
        f"#!/bin/bash\n[ -f {bin_dir}/STATE ] || exit 1\n"
        f'echo "JobId=$4 JobName=x JobState=$(cat {bin_dir}/STATE) Reason=None Restarts=1 RunTime=00:01:02 '
        'NodeList=n1"\n'
    )
    for tool in ("sbatch", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/usr/bin')}:{Path('/bin')}")
    return bin_dir


# ---------------------------------------------------------------------------------------------
# Rendering


def test_dry_run_prints_a_complete_script_and_writes_nothing(capsys, workdir):
    code, out, _ = pretrain(
        capsys,
        "submit",
        GPT_TINY,
        "train.lr=5e-4",
        "--nodes",
        "2",
        "--partition",
        "gpu",
        "--time",
        "02:00:00",
        "--dry-run",
    )
    assert code == 0
    assert "{{" not in out and "}}" not in out
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=02:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={workdir.resolve()}/runs/gpt-tiny/slurm/%j.out",
        'export NCCL_DEBUG="WARN"',
        'export OMP_NUM_THREADS="8"',
    ):
        assert line in out.splitlines(), line
    assert '-m launch.cli run "$CONFIG" cluster.address=auto' in out
    assert "scontrol requeue" in out and "trap on_warning USR1" in out
    assert "--account" not in out and "--qos" not in out and "--gpus-per-node=" not in out
    assert not workdir.exists()


def test_rendered_script_is_valid_bash(capsys, workdir, tmp_path):
    _, out, _ = pretrain(capsys, "submit", GPT_TINY, "--sweep", "train.lr=1e-3,3e-4", "--dry-run")
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_gpu_allocation_sets_workers_and_cpus_per_worker(capsys, workdir, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "account": "proj1",
                "qos": "high",
                "modules": ["cuda/12.4", "nccl"],
                "setup": ["source /shared/venv/bin/activate"],
                "cpus_per_task": 32,
                "env": {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": None},
                "object_store_bytes": 2_000_000_000,
                "ray_port": 31000,
            }
        )
    )
    code, out, _ = pretrain(
        capsys, "submit", GPT_TINY, "--site", str(site), "--nodes", "2", "--gpus-per-node", "4", "--dry-run"
    )
    assert code == 0
    lines = out.splitlines()
    for line in (
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --account=proj1",
        "#SBATCH --qos=high",
        "module load cuda/12.4 nccl",
        "source /shared/venv/bin/activate",
        'export OMP_NUM_THREADS="8"',
        'export NCCL_SOCKET_IFNAME="ib0"',
    ):
        assert line in lines, line
    assert "NCCL_DEBUG" not in out and "RAY_PORT=31000" in out and "--object-store-memory=2000000000" in out


def test_template_drops_unused_sbatch_options_and_empty_blocks():
    template = "#SBATCH --qos={{qos}}\n#SBATCH --time={{time}}\n{{modules}}\necho {{word}}\n"
    rendered = render_template(template, {"qos": None, "time": "01:00:00", "modules": "", "word": "hi"})
    assert rendered == "#SBATCH --time=01:00:00\necho hi\n"


def test_template_and_values_must_match():
    with pytest.raises(SlurmError, match=r"without a value \['b'\].*without a placeholder \['c'\]"):
        render_template("{{a}} {{b}}", {"a": 1, "c": 2})


def test_repository_template_has_the_preemption_directives():
    text = template_text()
    assert "#SBATCH {{requeue}}" in text and "#SBATCH --signal=B:USR1@{{signal_seconds}}" in text
    assert "srun --nodes=1 --ntasks=1" in text and "ray_start --head" in text


@pytest.mark.parametrize("example", ["multi-node.sh", "sweep-array.sh"])
def test_every_slurm_example_renders_a_job(example, tmp_path, monkeypatch):
    """The commented examples in slurm/examples/ are commands that work: run with --dry-run appended,
    each prints a job script for the nodes and array it describes."""
    monkeypatch.delenv("PRETRAIN_SITE", raising=False)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "examples" / example), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    script = result.stdout
    assert script.startswith("#!/bin/bash") and "-m launch.cli run" in script
    if example == "multi-node.sh":
        assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
        assert "#SBATCH --partition=gpu" in script and "#SBATCH --exclusive" in script
    else:
        assert "#SBATCH --array=0-5%3" in script


# ---------------------------------------------------------------------------------------------
# Settings


def test_site_file_from_environment_then_flags_win(tmp_path, monkeypatch):
    site = tmp_path / "site.yaml"
    site.write_text("partition: cpu\ntime: '08:00:00'\nenv: {OMP_PROC_BIND: close}\n")
    monkeypatch.setenv("PRETRAIN_SITE", str(site))
    settings = load_settings(None, {"time": "00:10:00", "partition": None})
    assert settings.partition == "cpu" and settings.time == "00:10:00"
    assert settings.env == {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_PROC_BIND": "close"}


def test_unknown_site_key_is_named_with_a_suggestion(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("partiton: gpu\n")
    with pytest.raises(SlurmError, match=r"site.yaml: unknown Slurm setting `partiton` \(did you mean `partition`"):
        load_settings(str(site))


def test_missing_site_file_is_a_clear_error(tmp_path):
    with pytest.raises(SlurmError, match="no such site file"):
        load_settings(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"cpus_per_task": 2, "gpus_per_node": 4}, "less than one CPU to each of the 4 training workers"),
        ({"signal_seconds": 60, "checkpoint_wait_s": 90}, "must be below signal_seconds=60"),
    ],
)
def test_inconsistent_settings_are_refused(values, message):
    with pytest.raises(SlurmError, match=message):
        load_settings(None, values)


def test_every_setting_has_a_description():
    assert all(field.description for field in SlurmSettings.model_fields.values())


# ---------------------------------------------------------------------------------------------
# Sweeps


def test_sweep_dry_run_is_one_array_with_a_run_per_combination(capsys, workdir, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("array_parallel: 2\n")
    code, out, _ = pretrain(
        capsys,
        "submit",
        GPT_TINY,
        "--site",
        str(site),
        "--sweep",
        "train.lr=1e-3,3e-4",
        "--sweep",
        "model.n_layers=2,4",
        "--dry-run",
    )
    assert code == 0
    assert "#SBATCH --array=0-3%2" in out.splitlines()
    run_dirs = re.search(r"^RUN_DIRS=\((.*)\)$", out, re.M).group(1).split()
    assert [Path(d).name for d in run_dirs] == [
        "gpt-tiny-lr=1e-3-n_layers=2",
        "gpt-tiny-lr=1e-3-n_layers=4",
        "gpt-tiny-lr=3e-4-n_layers=2",
        "gpt-tiny-lr=3e-4-n_layers=4",
    ]
    assert re.search(r"^#SBATCH --output=.*/sweeps/gpt-tiny-\d{8}-\d{6}/%A_%a.out$", out, re.M)


def test_an_invalid_combination_fails_before_anything_is_submitted(capsys, workdir, fake_slurm):
    code, _, err = pretrain(capsys, "submit", GPT_TINY, "--sweep", "model.n_heads=4,5")
    assert code == 2
    assert "model.n_heads=5 as submitted" in err and "must divide model.d_model=128" in err
    assert not (fake_slurm / "sbatch.calls").exists() and not workdir.exists()


# ---------------------------------------------------------------------------------------------
# Submitting, resubmitting and status against stand-in sbatch/scontrol


def test_submit_writes_the_run_files_and_records_the_job(capsys, workdir, fake_slurm):
    code, out, _ = pretrain(capsys, "submit", GPT_TINY, "--nodes", "2", "--cpus-per-task", "4")
    assert code == 0
    run_dir = workdir.resolve() / "runs" / "gpt-tiny"
    assert "submitted job 4242: run gpt-tiny" in out and f"tail -f {run_dir}/slurm/4242.out" in out
    assert (fake_slurm / "sbatch.calls").read_text().split() == ["--parsable", f"{run_dir}/slurm/job.sbatch"]
    config = load_config(run_dir / "slurm" / "config.yaml")
    assert (config.cluster.address, config.cluster.num_workers, config.cluster.cpus_per_worker) == ("auto", 2, 4)
    assert config.train.global_batch_size == 8 * 2 and config.run.workdir == str(workdir.resolve())
    assert yaml.safe_load((run_dir / "slurm" / "settings.yaml").read_text())["nodes"] == 2
    [job] = json.loads((run_dir / "slurm" / "jobs.json").read_text())
    assert job["slurm_id"] == "4242" and job["log"] == f"{run_dir}/slurm/4242.out"


def test_a_run_with_an_active_job_is_not_submitted_twice(capsys, workdir, fake_slurm):
    assert pretrain(capsys, "submit", GPT_TINY)[0] == 0
    (fake_slurm / "STATE").write_text("RUNNING")
    code, _, err = pretrain(capsys, "submit", GPT_TINY)
    assert code == 2 and "already has job 4242 (RUNNING)" in err and "scancel 4242" in err


def test_resume_reuses_the_saved_config_and_settings(capsys, workdir, fake_slurm):
    assert pretrain(capsys, "submit", GPT_TINY, "train.lr=5e-4", "--nodes", "2", "--partition", "a")[0] == 0
    (fake_slurm / "STATE").write_text("TIMEOUT")
    run_dir = workdir.resolve() / "runs" / "gpt-tiny"
    code, out, _ = pretrain(capsys, "submit", "--resume", str(run_dir), "--time", "00:30:00")
    assert code == 0 and "submitted job 4242" in out
    script = (run_dir / "slurm" / "job.sbatch").read_text().splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --partition=a", "#SBATCH --time=00:30:00"} <= set(script)
    assert load_config(run_dir / "slurm" / "config.yaml").train.lr == 5e-4
    assert len(json.loads((run_dir / "slurm" / "jobs.json").read_text())) == 2


def test_resume_needs_a_run_directory(capsys, workdir, tmp_path):
    code, _, err = pretrain(capsys, "submit", "--resume", str(tmp_path))
    assert code == 2 and "is this a run directory?" in err


def test_submit_without_sbatch_says_how_to_proceed(capsys, workdir, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = pretrain(capsys, "submit", GPT_TINY)
    assert code == 2 and "sbatch not found" in err and "--dry-run" in err


def test_status_shows_stages_checkpoint_job_and_mlflow_url(capsys, workdir, fake_slurm):
    assert pretrain(capsys, "submit", GPT_TINY)[0] == 0
    (fake_slurm / "STATE").write_text("RUNNING")
    run_dir = workdir.resolve() / "runs" / "gpt-tiny"
    (run_dir / "run.json").write_text(
        json.dumps({"stages": {"tokenizer": {"status": "done", "reused": True}, "train": {"status": "running"}}})
    )
    checkpoint = run_dir / "checkpoints" / "step-00000020"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 20, "tokens_seen": 40960}))
    (checkpoint / "COMPLETE").touch()
    (run_dir / "checkpoints" / "latest").write_text("step-00000020\n")
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "time_ms": 0, "metrics": {"train/loss": 9.0 - s / 10}}) + "\n" for s in (1, 25))
    )
    (run_dir / "mlflow_run_id").write_text("abc123\n")
    (run_dir / "mlflow_target.json").write_text(json.dumps({"uri": "http://127.0.0.1:5000"}))
    code, out, _ = pretrain(capsys, "status", str(run_dir))
    assert code == 0
    assert "stages     tokenizer done (reused), train running" in out
    assert "checkpoint step-00000020  (step 20, 40,960 tokens)" in out
    assert "training   step 25, train loss 6.5000" in out
    assert "slurm      job 4242: RUNNING, restarts 1, run time 00:01:02, nodes n1" in out
    assert "mlflow     http://127.0.0.1:5000/#/runs/abc123" in out


def test_status_of_a_fresh_run_directory(capsys, tmp_path):
    code, out, _ = pretrain(capsys, "status", str(tmp_path))
    assert code == 0
    assert "stages     none started" in out and "checkpoint none yet" in out
    assert "no job submitted" in out and "no MLflow run yet" in out


def test_resume_refuses_a_finished_run(capsys, workdir, fake_slurm):
    assert pretrain(capsys, "submit", GPT_TINY)[0] == 0
    run_dir = workdir.resolve() / "runs" / "gpt-tiny"
    (run_dir / "run.json").write_text(
        json.dumps({"stages": {name: {"status": "done"} for name in ("tokenizer", "shard", "train", "eval")}})
    )
    code, _, err = pretrain(capsys, "submit", "--resume", str(run_dir))
    assert code == 2 and "is finished" in err
