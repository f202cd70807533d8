"""One run per run directory (flock), taken over from a dead holder; a run directory that cannot be
written is one line before anything is written."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import RunBusy, StorageError
from pipeline.run.guard import run_is_held, run_lock, writable_run_dir

REPO = Path(__file__).resolve().parents[3]
HOLD = (
    "import sys, time\n"
    "from pipeline.run.guard import run_lock\n"
    "with run_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run's lock until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_holder_is_refused_naming_pid_and_host_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        assert run_is_held(tmp_path)
        started = time.monotonic()
        holder_name = rf"is in use by pid {holder.pid} on {re.escape(socket.gethostname())},"
        with pytest.raises(RunBusy, match=holder_name), run_lock(tmp_path):
            pass
        assert time.monotonic() - started < 1  # at once, no waiting
    finally:
        holder.kill()
        holder.wait()
    assert not run_is_held(tmp_path)  # the kernel released the dead process's lock
    with run_lock(tmp_path):
        assert run_is_held(tmp_path)
        assert (tmp_path / "run.lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    assert not run_is_held(tmp_path)


def test_a_run_without_a_lock_file_counts_as_held(tmp_path):
    assert run_is_held(tmp_path / "never-started")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_a_read_only_workdir_is_one_line_and_nothing_is_written(tmp_path):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(workdir)], check=True)
    try:
        with pytest.raises(StorageError, match=r"cannot be created or written \(Read-only file system\); make it"):
            writable_run_dir(workdir / "runs" / "x")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "launch.cli",
                "run",
                str(REPO / "configs" / "gpt-tiny.yaml"),
                f"run.workdir={workdir}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "Read-only file system" in result.stderr
        assert "set run.workdir to a writable directory" in result.stderr
        assert not any(workdir.iterdir())
    finally:
        subprocess.run(["umount", str(workdir)], check=True)
    # The fix the message gives: a writable run.workdir; the run directory is then made and can be written.
    assert writable_run_dir(tmp_path / "rw" / "runs" / "x").is_dir()
