"""Errors a user can fix from the message alone. A leaf: it imports nothing from the project.

Every `UserError` is already phrased as one line that names the file, key or value and the fix. The
CLI, the torchrun entry point and the Ray boundaries catch `UserError` and nothing else: they print
the line (no traceback on the console) and keep the traceback in the run's `logs/`. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """Escape newlines and other unprintable characters, which YAML keys, paths and CLI arguments may hold."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class UserError(Exception):
    """A problem in the user's input or environment, with its fix; shown as one console line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))


class ConfigError(UserError):
    """A config key, value, override or command-line argument is wrong."""


class DataError(UserError):
    """A corpus, shard directory or index.json cannot be used (missing, corrupt, inconsistent)."""


class StorageError(UserError):
    """The run directory cannot hold the run: unwritable, too little free space, or a write failed."""


class RunBusy(UserError):
    """Another process holds the run directory's lock: one run per run directory."""


class CheckpointError(UserError):
    """A checkpoint that cannot or must not be loaded (missing, incomplete, or pickling code)."""


class TrainingDiverged(UserError):
    """Too many steps with a non-finite loss or gradient and no checkpoint to roll back to."""


class TrackingError(UserError):
    """MLflow could not be reached or refused a request the user asked for (sync, compare, UI)."""


class ExportError(UserError):
    """A checkpoint cannot be exported to, or evaluated in, the requested format."""


class SlurmError(UserError):
    """A Slurm setting, site file or job request is wrong, or Slurm refused it."""


class SweepError(UserError):
    """A sweep's axes, options or earlier state are wrong (`pretrain sweep`, `pretrain submit --sweep`)."""


class StageFailed(UserError):
    """A pipeline stage raised: names the stage and its traceback file; earlier artifacts are kept."""

    def __init__(self, stage: str, cause: str, log: object | None) -> None:
        where = f"traceback: {log}" if log is not None else "its traceback could not be saved"
        super().__init__(f"stage `{stage}` failed: {cause} ({where}; artifacts of earlier stages are kept)")
        self.stage, self._args = stage, (stage, cause, log)

    def __reduce__(self):  # copied and pickled by Ray Tune when a trial fails
        return type(self), self._args


class RunStopped(UserError):
    """Training stopped on request (SIGTERM) after writing a checkpoint; later stages did not run."""

    def __init__(self, run_dir: object, step: int, interrupted: bool = False) -> None:
        why = "interrupted (Ctrl-C)" if interrupted else "stopped on request"
        super().__init__(f"run {why} at step {step} after a checkpoint; continue it with `pretrain resume {run_dir}`")
        self.step, self.interrupted, self._args = step, interrupted, (run_dir, step, interrupted)

    def __reduce__(self):
        return type(self), self._args
