"""The project as a user installs it: a wheel, installed without the source tree, renders a Slurm job
(the sbatch template is package data, not a file found next to the sources)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_a_wheel_installed_without_the_sources_renders_a_job(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "work", "test-artifacts", "__pycache__", "*.egg-info", "build"),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("pretrain-*.whl")
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    shutil.rmtree(source)

    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(REPO / "configs" / "gpt-tiny.yaml", work / "gpt-tiny.yaml")
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import launch.slurm, pipeline; print(pipeline.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    rendered = subprocess.run(
        [sys.executable, "-m", "launch.cli", "submit", "gpt-tiny.yaml", "--nodes", "2", "--dry-run"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert rendered.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in rendered.stdout
    assert "-m launch.slurm wait-ray" in rendered.stdout
