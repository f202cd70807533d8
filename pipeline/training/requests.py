"""Checkpoint requests: SIGUSR1 asks for a checkpoint at the next check (see Checkpointer), SIGTERM and the first
SIGINT (Ctrl-C) for a checkpoint and a clean stop; a second SIGINT stops at once.

A rank installs the handlers itself when it runs in the main thread (torchrun). Ray runs the training
function outside the main thread, where no handler can be installed, so the driver forwards the same
signals by writing `<run_dir>/checkpoint_request` (`forward_signals`), which rank 0 reads. All ranks
agree on a request through one small all-reduce per step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.run.artifacts import atomic_write_text
from pipeline.run.rundir import REQUEST_FILE

NO_REQUEST, CHECKPOINT, CHECKPOINT_AND_STOP = 0, 1, 2
_STOP_WORD = "stop"


class CheckpointRequests:
    """The strongest request since the last step boundary, from signals or the driver's request file."""

    def __init__(self, run_dir: Path, rank: int):
        self.path, self.rank, self.flag = Path(run_dir) / REQUEST_FILE, rank, NO_REQUEST
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.flag == CHECKPOINT_AND_STOP:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (`latest` names the last complete checkpoint)
        self.flag = max(self.flag, CHECKPOINT if signum == signal.SIGUSR1 else CHECKPOINT_AND_STOP)

    def agreed(self, device: torch.device) -> int:
        """The strongest request of any rank (one small all-reduce); clears it."""
        local = self.flag
        if self.rank == 0 and self.path.exists():
            local = max(local, CHECKPOINT_AND_STOP if self.path.read_text().strip() == _STOP_WORD else CHECKPOINT)
            self.path.unlink(missing_ok=True)
        flag = torch.tensor(local, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.flag = NO_REQUEST
        return int(flag.item())

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Forwarded:
    """What the driver forwarded: `interrupted` once a Ctrl-C (SIGINT) asked for a checkpoint and a stop."""

    interrupted: bool = False


def write_request(run_dir: Path, stop: bool) -> None:
    """Ask rank 0 for a checkpoint at its next check, and a clean stop after it when `stop`."""
    atomic_write_text(Path(run_dir) / REQUEST_FILE, _STOP_WORD if stop else "checkpoint")


@contextmanager
def forward_signals(run_dir: Path, echo=print) -> Iterator[Forwarded]:
    """While workers train, SIGUSR1/SIGTERM to this driver become a checkpoint request file. The first
    SIGINT (Ctrl-C) does what SIGTERM does, a checkpoint at the next check and a stop; a second
    one stops at once (KeyboardInterrupt; `latest` still names the last complete checkpoint)."""
    forwarded = Forwarded()

    def forward(signum, frame):
        if signum == signal.SIGINT:
            if forwarded.interrupted:
                raise KeyboardInterrupt
            forwarded.interrupted = True
            echo("interrupt: writing a checkpoint within train.log_every steps, then stopping (Ctrl-C again: stop now)")
        write_request(run_dir, stop=signum in (signal.SIGTERM, signal.SIGINT))

    if threading.current_thread() is not threading.main_thread():
        yield forwarded
        return
    signals = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, forward) for signum in signals}
    try:
        yield forwarded
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
