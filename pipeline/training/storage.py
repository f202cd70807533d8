"""Checkpoint storage: room for the run's checkpoints before training, and a failed write as one line.

Before training, `check_storage` refuses a run directory that is not writable or lacks the free space
for the checkpoints the run will hold at once. A save that fails anyway (the disk filled up meanwhile)
raises StorageError naming the checkpoint directory, the bytes free and needed, and the fix; `latest`
still names the previous checkpoint, which stays intact, and the partial directory is removed.
"""

from __future__ import annotations

import shutil
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import StorageError
from pipeline.run.guard import writable_run_dir


@contextmanager
def failed_writes_reported(path: Path, latest: str | None, rank: int) -> Iterator[None]:
    """A failed write becomes a StorageError that names the checkpoint and what is kept; rank 0 removes
    the partial directory (unless `latest` already names it: then only the cleanup after it failed)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _is_write_failure(exc):
            raise
        if rank == 0 and latest != path.name:
            shutil.rmtree(path, ignore_errors=True)
        kept = f"the last good checkpoint {latest} is kept as `latest`" if latest else "there is no earlier checkpoint"
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        needed = f"a checkpoint needs about {_tree_bytes(path.parent / latest):,}" if latest else "more is needed"
        raise StorageError(
            f"writing checkpoint {path} failed ({reason}; {_free_bytes(path.parent):,} bytes free "
            f"there, {needed}); {kept}. Free space or lower train.keep_checkpoints, then run again to "
            "resume"
        ) from exc


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or a RuntimeError raised inside torch.save: it reports a full disk from its C++ writer
    ("unexpected pos", "iostream error", ...), not as an OSError. Collective errors stay what they are."""
    if isinstance(exc, OSError):
        return True
    return any(
        Path(frame.f_code.co_filename).parts[-2:] == ("torch", "serialization.py")
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def _tree_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _free_bytes(directory: Path) -> int:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def check_storage(root: Path, checkpoint_bytes: int, keep: int, existing: int) -> None:
    """Before training: the checkpoints directory is writable and its filesystem has room for what the
    run will hold at once: `keep` checkpoints plus the one being written (existing complete ones
    count as already written). `root` is the checkpoints directory, `existing` its complete checkpoints."""
    writable_run_dir(root)
    needed, free = checkpoint_bytes * (keep + 1 - min(existing, keep)), shutil.disk_usage(root).free
    if needed > free:
        raise StorageError(
            f"{root} has {free:,} bytes free but this run needs about {needed:,} for its "
            f"checkpoints ({keep} kept + 1 being written, ~{checkpoint_bytes:,} bytes each); free "
            "space, lower train.keep_checkpoints, or set run.workdir on a larger filesystem"
        )
