"""Which errors a user can fix from the message alone: the CLI prints them as one line, no traceback."""
from __future__ import annotations

from pipeline.config import ConfigError


def is_user_error(exc: BaseException) -> bool:
    """Config, data, export and tracking problems, stage failures (whose traceback is already in the
    run's logs/) and missing or unwritable files."""
    from pipeline.data import DataError
    from pipeline.export import ExportError
    from pipeline.orchestrate import RunStopped, StageFailed
    from pipeline.tracking import TrackingError

    known = (ConfigError, DataError, ExportError, RunStopped, StageFailed, TrackingError, FileNotFoundError,
             NotADirectoryError, PermissionError)
    return isinstance(exc, known)
