"""Which errors a user can fix from the message alone: the CLI prints them as one line, no traceback."""
from __future__ import annotations

from pipeline.config import ConfigError


class StorageError(RuntimeError):
    """The run directory cannot hold the run's checkpoints: unwritable, too little free space, or a
    write failed (the message names the directory, the bytes involved and the fix)."""


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: it holds pickled objects this pipeline never writes."""


class TrainingDiverged(RuntimeError):
    """Too many steps with a non-finite loss or gradient and no checkpoint to roll back to."""


def is_user_error(exc: BaseException) -> bool:
    """Config, data, export, tracking, storage and checkpoint problems, diverged training, stage failures
    (whose traceback is already in the run's logs/) and missing or unwritable files."""
    from pipeline.data import DataError
    from pipeline.export import ExportError
    from pipeline.orchestrate import RunStopped, StageFailed
    from pipeline.tracking import TrackingError

    known = (ConfigError, DataError, ExportError, RunStopped, StageFailed, TrackingError, StorageError,
             CheckpointError, TrainingDiverged, FileNotFoundError, NotADirectoryError, PermissionError)
    return isinstance(exc, known)
