"""One run per run directory, in a directory that can hold it.

`writable_run_dir` checks, before anything is written, that the run directory can be created and
written (a read-only or uncreatable workdir is one line naming it). `run_lock` is an OS-level lock
(flock on `<run_dir>/run.lock`) that the driver holds for the whole run, and the torchrun entry's rank
0 the same way: a second `pretrain run`, `resume` or `branch` on the directory fails at once, naming
the PID and host that hold it. flock is released by the kernel when its holder dies, so a lock left
by a killed process is simply taken over. `run_is_held` lets a training rank see that the process
holding the run is gone (a rank orphaned by a killed driver must not write a checkpoint).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import RunBusy, StorageError
from pipeline.run.rundir import LOCK_FILE


def writable_run_dir(run_dir: Path) -> Path:
    """Create a directory of the run (and its parents) and probe that a file can be written in it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise StorageError(
            f"{run_dir} cannot be created or written ({exc.strerror or exc}); make it writable or set "
            "run.workdir to a writable directory"
        ) from None
    return run_dir


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock while the block runs; RunBusy naming the holder if another has it."""
    path = Path(run_dir) / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the block)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunBusy(
            f"{run_dir} is in use by {holder}, which is running this run; wait for it to end or stop it "
            "(a run directory holds one run at a time; use another run.name for a second run)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def run_is_held(run_dir: Path) -> bool:
    """Whether some process holds the run's lock (True when the run has no lock file: nothing to ask)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        return True
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
