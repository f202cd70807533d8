"""What reaches the user's terminal: the pipeline's own lines, and nothing from the libraries under it.

The `pretrain` command is the application, so it alone decides where logging goes (library modules of
the project never configure logging or change the environment):
- the pipeline's warnings (`pipeline.*`, `launch.*` loggers) are one plain line on stderr each;
- every library logger (Ray, MLflow, DeepSpeed, torch, transformers, ...) goes to a log file: the run's
  `logs/driver.log` once a run directory is known, before that a file under the temp directory;
- MLflow is told not to install its own stderr handler, and Ray workers' output stays in the Ray
  session logs (pipeline/run/runtime.py attaches without forwarding it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

_PROJECT_LOGGERS = ("pipeline", "launch")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_file_handler: logging.Handler | None = None
_console_handler: logging.Handler | None = None


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def setup() -> None:
    """Console for the project's warnings, a file for everything else; first thing in `main` (again: no-op)."""
    global _console_handler
    if _console_handler is not None:
        return
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    console = _console_handler = logging.StreamHandler()
    console.setFormatter(_Plain())
    console.setLevel(logging.WARNING)
    for name in _PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(console)
        logger.setLevel(logging.INFO)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    # A log file that cannot be written (a full disk) must not print logging's own tracebacks on the
    # console: the failure that matters reaches the user as one line.
    logging.raiseExceptions = False
    logging.captureWarnings(True)  # library warnings (FutureWarning, ...) are log records: to the file
    warnings.simplefilter("default")
    log_to(Path(tempfile.gettempdir()) / "pretrain-logs" / f"pretrain-{os.getpid()}.log")


def log_to(path: Path) -> Path:
    """Send the library log (and the project's own records) to `path` from now on."""
    global _file_handler
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
    root.addHandler(handler)
    _file_handler = handler
    return path


class _ToLogFile(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if _file_handler is not None:
            _file_handler.handle(record)


def file_only(name: str) -> None:
    """Records of logger `name` go to the log file only, never past it to a console handler a library
    put on a parent logger (Ray's `ray` logger has one, for errors: Ray Tune's trial errors would print
    there, and a sweep reports its failed trials itself)."""
    logger = logging.getLogger(name)
    logger.propagate = False
    if not any(isinstance(handler, _ToLogFile) for handler in logger.handlers):
        logger.addHandler(_ToLogFile())
