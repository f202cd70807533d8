"""Asynchronous checkpoints (train.async_checkpoint): at a checkpoint step a rank only copies its state
into host memory; a background thread writes the files while training goes on.

`SnapshotWriter` stands in for DeepSpeed's checkpoint engine (its interface, by delegation: DeepSpeed
calls `save(state_dict, path)` for every file it writes). Its `save` copies the state dict's tensors to
host memory, which is the whole stall, and queues the write; the thread writes it as DeepSpeed's own
engine does (into an open file, which keeps the GIL free: see `_write`), fsyncs the file and hashes
it (the checksums the seal records, off the training thread too).

Crash safety is the synchronous path's (pipeline/training/checkpoint.py): a checkpoint is sealed
(checksums, COMPLETE, then `latest`) only once every rank's files are written and fsynced. The ranks
learn that from one small all-reduce at the log cadence (`PendingCheckpoint.poll`), never with a wait;
then they hand rank 0 their files' digests and rank 0 seals, which writes three small files. A crash
before the seal leaves the previous checkpoint as `latest`. At most one checkpoint is in flight: the
next one, the last one and a stop first wait for it.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.run.artifacts import file_sha256
from pipeline.training.checkpoint import prune, seal
from pipeline.training.storage import failed_writes_reported

IDLE, BUSY, FAILED = 0, 1, 2


def host_copy(value: Any) -> Any:
    """The state dict with every tensor copied to host memory (training goes on changing the originals);
    containers are rebuilt, other values kept (numbers, strings and sizes do not change in place)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, OrderedDict):
        return OrderedDict((key, host_copy(item)) for key, item in value.items())
    if isinstance(value, dict):
        return {key: host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(item) for item in value)
    return value


def skip_zip_crc32() -> None:
    """torch.save without the zip format's CRC32 of every record: it triples the write's CPU time (0.40 s
    instead of 1.49 s for 600 MB here), which on a CPU-bound machine the background write takes from
    training, and every checkpoint file's sha256 is in checksums.json anyway. (torch >= 2.6; the files
    load the same.)"""
    try:
        from torch.utils.serialization import config
    except ImportError:  # an older torch: the CRC stays
        return
    config.save.compute_crc32 = False


class SnapshotWriter:
    """DeepSpeed's checkpoint engine, with `save` made asynchronous (everything else is the engine's)."""

    def __init__(self, inner):
        self.inner = inner
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.futures: list[Future] = []
        self.digests: dict[str, dict[str, Any]] = {}  # written file -> {"bytes", "sha256"}
        self.inline = False
        skip_zip_crc32()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @contextmanager
    def synchronous(self) -> Iterator[None]:
        """Saves inside the block are written before `save` returns (the last checkpoint, a stop)."""
        self.wait()
        self.inline = True
        try:
            yield
        finally:
            self.inline = False

    def save(self, state_dict, path: str) -> None:
        if self.inline:
            self.inner.save(state_dict, path)
        else:
            self.submit(self._write, host_copy(state_dict), path)

    def _write(self, snapshot, path: str) -> None:
        """DeepSpeed's engine's `torch.save`, but into an open file: given a path, torch's zip writer
        holds the GIL while it writes, which stalls the training thread for the whole write
        (bench/writer_contention.py: a training-like step 1.33x slower beside it, 1.04x beside the
        same save into an open file).
        Fsynced: durable before any rank reports it done."""
        with open(path, "wb") as file:
            torch.save(snapshot, file, _use_new_zipfile_serialization=self.inner.zipfile_serialization)
            file.flush()
            os.fsync(file.fileno())
        self.digests[str(Path(path).resolve())] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}

    def submit(self, work, *args) -> None:
        self.futures.append(self.executor.submit(work, *args))

    def digests_under(self, directory: Path) -> dict[str, dict[str, Any]]:
        """The digests of the files written under `directory`, by name relative to it (and forgets them)."""
        root = str(Path(directory).resolve())
        mine = {name: digest for name, digest in self.digests.items() if name.startswith(root + os.sep)}
        for name in mine:
            del self.digests[name]
        return {os.path.relpath(name, root): digest for name, digest in mine.items()}

    def status(self) -> int:
        if not all(future.done() for future in self.futures):
            return BUSY
        return FAILED if any(future.exception() is not None for future in self.futures) else IDLE

    def wait(self) -> None:
        """Block until everything queued is done; re-raise the first failure."""
        futures, self.futures = self.futures, []
        for future in futures:
            future.result()


class PendingCheckpoint:
    """The one checkpoint a rank has in flight, and how it gets sealed. Every rank calls each method at the
    same step: they are collective."""

    def __init__(self, writer: SnapshotWriter, rank: int, seal):
        self.writer, self.rank, self.seal = writer, rank, seal  # seal(path, digests): checksums, COMPLETE, latest
        self.path: Path | None = None
        self.latest: str | None = None  # `latest` when it started: what a failed write reports as kept

    def started(self, path: Path, latest: str | None) -> None:
        self.path, self.latest = path, latest

    def poll(self, device: torch.device) -> Path | None:
        """Seal the pending checkpoint if every rank's files are durable (one small all-reduce tells);
        returns it then, else None. A rank whose write failed raises its StorageError; the others wait
        at a barrier for the launcher to stop them, as in a synchronous save."""
        if self.path is None:
            return None
        status = self.writer.status()
        flags = torch.tensor([status == BUSY, status == FAILED], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        busy, failed = (bool(flag) for flag in flags.tolist())
        if busy:
            return None
        if failed:
            self._wait_reporting_failures()
            dist.barrier()  # another rank failed: it raises; this one waits to be stopped
        return self._seal()

    def finish(self) -> Path | None:
        """Wait until the pending checkpoint is written everywhere, then seal it (before the next save,
        the last one, a stop); returns it, or None when there was none."""
        if self.path is None:
            return None
        self._wait_reporting_failures()
        return self._seal()

    def discard(self) -> None:
        """A rollback reloaded `latest`: the pending checkpoint is of steps about to be trained again."""
        if self.path is None:
            return
        self._wait_reporting_failures()
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path = None

    def _seal(self) -> Path:
        path, self.path = self.path, None
        digests = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(self.writer.digests_under(path), digests, dst=0)
        if self.rank == 0:
            with failed_writes_reported(path, self.latest, self.rank):
                self.seal(path, {name: digest for rank_digests in digests for name, digest in rank_digests.items()})
        dist.barrier()  # `latest` moved before any rank goes on
        return path

    def _wait_reporting_failures(self) -> None:
        with failed_writes_reported(self.path, self.latest, self.rank):
            self.writer.wait()


def seal_and_prune(path: Path, known_digests: dict[str, dict[str, Any]], keep: int) -> None:
    """Rank 0's end of an asynchronous save: seal it, then keep the newest `keep` checkpoints."""
    seal(path, known_digests)
    prune(path.parent.parent, keep)
