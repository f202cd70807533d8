"""Training checkpoints: directory layout, the `latest` pointer, retention, RNG states, resume checks.

    <run_dir>/checkpoints/
        latest                    the tag of the newest complete checkpoint, replaced atomically
        step-00000500/
            mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed engine state (every rank's shard)
            trainer_state.json    step, tokens seen, loader state, world size, MLflow run id,
                                  config fingerprint and the resolved config it was saved with
            rng/rank-00000.pt     per-rank torch / numpy / python RNG states
            COMPLETE              written by rank 0 after every rank finished (a barrier)

A directory without COMPLETE is a checkpoint cut off by a crash: resume ignores it and the next save
removes it. This module does no torch.distributed itself; the caller passes the engine's save function
and a barrier, so it is testable in one process.

Storage. Before training, `check_storage` refuses a run directory that is not writable or lacks the
free space for the checkpoints the run will hold at once. A save that fails anyway (the disk filled
up meanwhile) raises StorageError naming the checkpoint directory; `latest` still names the previous
checkpoint, which stays intact, and the partial directory is removed.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import atomic_write_text
from pipeline.config import Config, flatten, lookup
from pipeline.errors import ConfigError, StorageError
from pipeline.rundir import (
    COMPLETE,
    LATEST,
    TRAINER_STATE,
    checkpoints_dir,
    complete_checkpoints,
    latest_pointer,
    latest_tag,
    read_trainer_state,
    tag_dirs,
    tag_for,
)

# Config keys a resumed run must keep: changing them changes the model, its parameters' layout in the
# checkpoint, or the token stream. Everything else (max_steps, cadences, lr, ...) may change on resume.
FROZEN_KEYS = (
    "model",
    "tokenizer",
    "data.sources",
    "data.val_permille",
    "data.shard_tokens",
    "data.max_documents",
    "data.partition_bytes",
    "run.seed",
    "train.seq_len",
    "train.zero_stage",
    "train.precision",
    "train.offload_optimizer",
    "train.offload_params",
)


def fingerprint(config: Config) -> str:
    """sha256 of the frozen part of the config (FROZEN_KEYS)."""
    frozen = {key: lookup(config.model_dump(mode="json"), key) for key in FROZEN_KEYS}
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()


def config_changes(saved: dict[str, Any], config: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every leaf that differs."""
    old, new = flatten(saved), flatten(config.model_dump(mode="json"))
    return {
        key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)
    }


def check_resumable(changes: dict[str, tuple[Any, Any]], checkpoint: Path) -> None:
    """Refuse changes of FROZEN_KEYS with a message naming the first such key."""
    for key, (old, new) in changes.items():
        if any(key == frozen or key.startswith(frozen + ".") for frozen in FROZEN_KEYS):
            raise ConfigError(
                f"{key}: the run in {checkpoint.parent.parent} was trained with {old!r}, the "
                f"config now says {new!r}; a resumed run cannot change it. Set it back to "
                f"{old!r}, or use a new run.name to start a fresh run"
            )


def resume_point(run_dir: Path, config: Config) -> tuple[Path, dict, dict] | None:
    """(checkpoint dir, trainer state, config changes) of `latest`, after checking that this config can
    continue it; None for a fresh run. Cheap: call it before building anything."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path = checkpoints_dir(run_dir) / tag
    state = read_trainer_state(path)
    changes = config_changes(state["config"], config)
    check_resumable(changes, path)
    return path, state, changes


# ---------------------------------------------------------------------------------------------
# Saving


def save(
    run_dir: Path,
    step: int,
    *,
    rank: int,
    save_engine: Callable[[Path, str], None],
    barrier: Callable[[], None],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Save a checkpoint of `step` (every rank calls this); returns its directory.

    All ranks write their DeepSpeed shard and RNG states; rank 0 writes trainer_state.json; after a
    barrier rank 0 marks it COMPLETE, moves `latest` to it and deletes all but the newest `keep`.
    A failed write raises StorageError on the failing rank (the launcher then stops the others)."""
    root, tag = checkpoints_dir(run_dir), tag_for(step)
    path = root / tag
    with _failed_writes_reported(run_dir, path, rank):
        save_engine(root, tag)
        save_rng_state(path, rank)
        if rank == 0:
            atomic_write_text(path / TRAINER_STATE, json.dumps(trainer_state, indent=1) + "\n")
    barrier()
    if rank == 0:
        with _failed_writes_reported(run_dir, path, rank):
            atomic_write_text(path / COMPLETE, "")
            atomic_write_text(root / LATEST, tag + "\n")
        prune(run_dir, keep)
    return path


@contextmanager
def _failed_writes_reported(run_dir: Path, path: Path, rank: int) -> Iterator[None]:
    """A failed write becomes a StorageError that names the checkpoint and what is kept; rank 0 removes
    the partial directory (unless `latest` already names it: then only the cleanup after it failed)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _is_write_failure(exc):
            raise
        latest = latest_pointer(run_dir)
        if rank == 0 and latest != path.name:
            shutil.rmtree(path, ignore_errors=True)
        kept = f"the last good checkpoint {latest} is kept as `latest`" if latest else "there is no earlier checkpoint"
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise StorageError(
            f"writing checkpoint {path} failed ({reason}; {_free_bytes(path.parent):,} bytes free "
            f"there); {kept}. Free space or lower train.keep_checkpoints, then run again to "
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


def _free_bytes(directory: Path) -> int:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def check_storage(run_dir: Path, checkpoint_bytes: int, keep: int) -> None:
    """Before training: the checkpoints directory is writable and its filesystem has room for what the
    run will hold at once: `keep` checkpoints plus the one being written (existing complete ones
    count as already written)."""
    root = checkpoints_dir(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise StorageError(
            f"{root} is not writable ({exc.strerror or exc}); make it writable or set run.workdir "
            "to a writable directory"
        ) from None
    existing = len(complete_checkpoints(run_dir))
    needed, free = checkpoint_bytes * (keep + 1 - min(existing, keep)), shutil.disk_usage(root).free
    if needed > free:
        raise StorageError(
            f"{root} has {free:,} bytes free but this run needs about {needed:,} for its "
            f"checkpoints ({keep} kept + 1 being written, ~{checkpoint_bytes:,} bytes each); free "
            "space, lower train.keep_checkpoints, or set run.workdir on a larger filesystem"
        )


def prune(run_dir: Path, keep: int) -> None:
    """Delete complete checkpoints older than the newest `keep`, and partial ones older than latest."""
    latest = latest_tag(run_dir)
    complete = complete_checkpoints(run_dir)
    stale = complete[:-keep] + [p for p in tag_dirs(run_dir) if not (p / COMPLETE).is_file() and p.name < latest]
    for path in stale:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete checkpoint directories a crash left behind (rank 0, before training): those without
    COMPLETE, and complete ones newer than `latest` (killed between COMPLETE and moving `latest`;
    training would write that step again into the same directory)."""
    latest = latest_pointer(run_dir)
    debris = [p for p in tag_dirs(run_dir) if not (p / COMPLETE).is_file() or (latest is not None and p.name > latest)]
    for path in debris:
        shutil.rmtree(path, ignore_errors=True)
    return debris


# ---------------------------------------------------------------------------------------------
# RNG states


def _rng_path(checkpoint: Path, rank: int) -> Path:
    return checkpoint / "rng" / f"rank-{rank:05d}.pt"


def save_rng_state(checkpoint: Path, rank: int) -> None:
    """torch (CPU and this rank's CUDA device), numpy and python RNG states of this rank."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {
            "name": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].copy()),
            "pos": numpy_state[2],
            "has_gauss": numpy_state[3],
            "cached_gaussian": numpy_state[4],
        },
        "python": _python_state_to_tensors(random.getstate()),
    }
    path = _rng_path(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_rng_state(checkpoint: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank (it was saved
    with fewer ranks), in which case the caller's seeding stands."""
    path = _rng_path(checkpoint, rank)
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_python_state_from_tensors(state["python"]))
    return True


def _python_state_to_tensors(state: tuple) -> dict[str, Any]:
    version, internal, gauss_next = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _python_state_from_tensors(state: dict[str, Any]) -> tuple:
    return state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss_next"]
