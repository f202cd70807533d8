"""The checkpoint manager: layout, discovery, saving, verification, retention and resume.

    <run_dir>/checkpoints/
        latest                    the tag of the newest complete checkpoint, replaced atomically
        manifest.json             every complete checkpoint's step, tokens and files (for MLflow)
        step-00000500/
            mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed engine state (every rank's shard)
            trainer_state.json    step, tokens seen, loader state, world size, MLflow run id,
                                  config fingerprint and the resolved config it was saved with
            rng/rank-00000.pt     per-rank torch / numpy / python RNG states (pipeline/training/rng.py)
            checksums.json        size and sha256 of every file above, written by rank 0 after a barrier
            COMPLETE              written by rank 0 last, once every rank's files are durable

A directory without COMPLETE is a checkpoint cut off by a crash: resume ignores it and the next save
removes it. Discovery and the resume checks import no torch (the CLI and the Slurm helpers use them).
Saving takes the engine's save function and a barrier from the caller, so it is testable in one
process; `save_checkpoint`, `resume` and `load_state` wire in the engine (pipeline/training/engine.py).
Asynchronous saves: pipeline/training/async_checkpoint.py. Storage checks and write failures:
pipeline/training/storage.py.

Resume. With the same world size every later loss equals the uninterrupted run's bit for bit (fp32).
The world size may change: the data position is mapped by global samples consumed (the loader's
state); ZeRO 1-3 partitions of another world size load through DeepSpeed's universal format,
converted by rank 0 next to the checkpoint and deleted after. Ranks that did not exist when the
checkpoint was saved start from the seeded RNG state.

Verification. A checkpoint is chosen for a resume or a rollback only after its files match
checksums.json: sizes always, sha256 unless train.verify_checkpoints is false. A damaged one (flipped
bytes, a truncated or missing file, no COMPLETE) is reported in one line, moved aside to
`step-N.damaged` and skipped for the newest intact one, which `latest` then names.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config, config_changes, lookup
from pipeline.errors import CheckpointError, ConfigError
from pipeline.run.artifacts import atomic_write_json, atomic_write_text, file_sha256
from pipeline.run.guard import run_is_held
from pipeline.run.rundir import CHECKPOINTS_DIR
from pipeline.training.storage import failed_writes_reported

if TYPE_CHECKING:
    from pipeline.training.run import Run

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_MANIFEST = "manifest.json"
CHECKSUMS = "checksums.json"
DAMAGED_SUFFIX = ".damaged"
_TAG = re.compile(r"^step-(\d{8})$")


# ---------------------------------------------------------------------------------------------
# Layout and discovery (torch-free: the CLI and the Slurm job helpers read run directories)


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def latest_pointer(run_dir: Path) -> str | None:
    """The tag `latest` names, complete or not; None when there is no pointer."""
    pointer = checkpoints_dir(run_dir) / LATEST
    return pointer.read_text(encoding="utf-8").strip() or None if pointer.is_file() else None


def latest_tag(run_dir: Path) -> str | None:
    """The tag `latest` points at, when that checkpoint is complete; None for a fresh run. A pointer to
    an incomplete checkpoint was damaged after the fact: `select_intact` moves it to an intact one."""
    tag = latest_pointer(run_dir)
    if tag is None:
        return None
    if not is_complete(checkpoints_dir(run_dir) / tag):
        raise CheckpointError(
            f"{checkpoints_dir(run_dir) / LATEST} names {tag!r}, which is not a complete checkpoint; "
            "rerun the command: the run resumes from the newest intact checkpoint"
        )
    return tag


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE).is_file()


def tag_dirs(run_dir: Path) -> list[Path]:
    """Every step-* directory under checkpoints/, complete or not, oldest first."""
    root = checkpoints_dir(run_dir)
    return sorted(p for p in root.glob("step-*") if p.is_dir() and _TAG.match(p.name)) if root.is_dir() else []


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in tag_dirs(run_dir) if is_complete(p)]


def resolve_checkpoint(run_dir: Path, tag: str | None = None) -> Path:
    """The directory of checkpoint `tag`, or of `latest`; CheckpointError naming what exists otherwise."""
    root = checkpoints_dir(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise CheckpointError(f"{root}: no checkpoint; train the run first (`pretrain run CONFIG`)")
    if not is_complete(root / tag):
        available = [p.name for p in complete_checkpoints(run_dir)]
        raise CheckpointError(f"{root / tag}: not a complete checkpoint; pick one of {available or 'none'}")
    return root / tag


# ---------------------------------------------------------------------------------------------
# Verification


def file_digests(path: Path, known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{relative file name: {"bytes", "sha256"}} of every file but the markers; `known` digests (the
    writers') are taken for files of the size they record."""
    known, digests = known or {}, {}
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name not in (COMPLETE, CHECKSUMS)):
        name, size = str(file.relative_to(path)), file.stat().st_size
        digest = known.get(name)
        digests[name] = digest if digest and digest["bytes"] == size else {"bytes": size, "sha256": file_sha256(file)}
    return digests


def damage(path: Path, check_hashes: bool) -> str | None:
    """Why the checkpoint at path cannot be trusted, or None: COMPLETE missing, a file missing or of
    another size than checksums.json says, or (check_hashes) another sha256."""
    if not is_complete(path):
        return f"{COMPLETE} is missing"
    if not (path / CHECKSUMS).is_file():
        return None  # written before checkpoints carried checksums: nothing to check against
    expected = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))["files"]
    for name, want in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{name} has {file.stat().st_size:,} bytes, not {want['bytes']:,}"
    if check_hashes:
        actual = file_digests(path)
        for name, want in expected.items():
            if actual[name]["sha256"] != want["sha256"]:
                return f"{name} fails its sha256 check"
    return None


def select_intact(run_dir: Path, check_hashes: bool, echo: Callable[[str], None] = print) -> str | None:
    """The newest intact checkpoint at or before `latest` (one process calls this before a resume).
    Each damaged one on the way is reported in one line and moved aside to `step-N.damaged`; `latest`
    then names the intact one. None when there is no checkpoint; CheckpointError when none is intact."""
    pointer = latest_pointer(run_dir)
    candidates = [p for p in reversed(tag_dirs(run_dir)) if pointer is None or p.name <= pointer]
    if pointer is None:
        candidates = [p for p in candidates if is_complete(p)]
    skipped = []
    for path in candidates:
        problem = damage(path, check_hashes)
        if problem is None:
            if path.name != pointer:
                atomic_write_text(checkpoints_dir(run_dir) / LATEST, path.name + "\n")
            return path.name
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        skipped.append(f"{path.name} ({problem})")
        echo(f"checkpoint {path} is damaged ({problem}): moved aside to {aside.name}; trying the one before")
    if skipped:
        raise CheckpointError(
            f"no intact checkpoint in {checkpoints_dir(run_dir)}: {'; '.join(skipped)} (moved aside as "
            f"*{DAMAGED_SUFFIX}); restore the files from a copy, or rerun to start the run from step 0"
        )
    return None


def fall_back_from(run_dir: Path, tag: str, reason: str, check_hashes: bool) -> str | None:
    """Move checkpoint `tag` aside (it is suspected: `reason`) for the newest intact one before it, which
    `latest` then names; None, with nothing changed, when there is none."""
    older = [p for p in complete_checkpoints(run_dir) if p.name < tag and damage(p, check_hashes) is None]
    if not older:
        return None
    path = checkpoints_dir(run_dir) / tag
    shutil.rmtree(path.with_name(tag + DAMAGED_SUFFIX), ignore_errors=True)
    path.rename(path.with_name(tag + DAMAGED_SUFFIX))
    atomic_write_text(checkpoints_dir(run_dir) / LATEST, older[-1].name + "\n")
    print(f"checkpoint {path} is suspected ({reason}): moved aside to {tag}{DAMAGED_SUFFIX}", flush=True)
    return older[-1].name


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Resume checks


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
    asynchronous: bool = False,
) -> Path:
    """Save a checkpoint of `step` (every rank calls this); returns its directory.

    All ranks write their DeepSpeed shard and RNG states; rank 0 writes trainer_state.json; after a
    barrier rank 0 marks it COMPLETE, moves `latest` to it and deletes all but the newest `keep`.
    A failed write raises StorageError on the failing rank (the launcher then stops the others).
    `asynchronous`: the engine's shards are written in the background; the caller seals it later."""
    from pipeline.training.rng import save_rng_state  # torch: only where a rank saves

    root, tag = checkpoints_dir(run_dir), tag_for(step)
    path, latest = root / tag, latest_pointer(run_dir)
    if rank == 0 and path.exists() and tag != latest:  # left by a run that later fell back before it
        shutil.rmtree(path)
    barrier()
    with failed_writes_reported(path, latest, rank):
        save_engine(root, tag)
        save_rng_state(path, rank)
        if rank == 0:
            atomic_write_text(path / TRAINER_STATE, json.dumps(trainer_state, indent=1) + "\n")
    if asynchronous:
        return path
    barrier()
    if rank == 0:
        with failed_writes_reported(path, latest, rank):
            seal(path)
        prune(run_dir, keep)
    return path


def seal(path: Path, known_digests: dict[str, dict[str, Any]] | None = None) -> None:
    """Record every file's size and sha256, mark the checkpoint COMPLETE, then move `latest` to it."""
    started = time.perf_counter()
    files = file_digests(path, known_digests)
    atomic_write_json(path / CHECKSUMS, {"files": files, "hash_seconds": round(time.perf_counter() - started, 3)})
    atomic_write_text(path / COMPLETE, "")
    atomic_write_text(path.parent / LATEST, path.name + "\n")


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
# A rank's state: the engine, loader position, RNG streams and counters


def save_checkpoint(run: Run, asynchronous: bool = False) -> Path:
    """Every rank calls this (DeepSpeed writes each rank's shard; a rank that skipped would hang the rest)."""
    import torch
    import torch.distributed as dist

    from pipeline.tracking.journal import mlflow_run_id
    from pipeline.training import engine

    # A rank whose driver died (SIGKILL) lives on for a moment: it must not write a checkpoint then.
    held = torch.tensor(int(run_is_held(run.run_dir)), device=run.device)
    dist.all_reduce(held, op=dist.ReduceOp.MIN)  # every rank decides the same
    if not held.item():
        raise CheckpointError(
            f"the process running {run.run_dir} is gone (its lock is free): this orphaned rank stops without "
            "writing a checkpoint; `pretrain resume RUN_DIR` continues from the last one"
        )
    return save(
        run.run_dir,
        run.step,
        rank=run.rank,
        asynchronous=asynchronous,
        barrier=dist.barrier,
        keep=run.config.train.keep_checkpoints,
        save_engine=lambda root, tag: engine.save_checkpoint(run.engine, root, tag),
        trainer_state={
            "step": run.step,
            "tokens_seen": run.tokens_seen,
            "loader": run.loader.state_dict(),
            "world_size": run.world_size,
            "mlflow_run_id": mlflow_run_id(run.run_dir),
            **run.health.state_dict(),
            "config_fingerprint": fingerprint(run.config),
            "config": run.config.model_dump(mode="json"),
        },
    )


def resume(run: Run, point: tuple[Path, dict, dict] | None) -> None:
    """Load the checkpoint `resume_point` found (engine, loader, RNG, counters)."""
    if point is None:
        return
    path, state, changes = point
    load_state(run, path, state, restore_loader=state["loader"] is not None)
    run.resumed_from = run.step
    run.health.load_state_dict(state)
    if run.rank == 0:
        print(f"resumed from {path} (step {run.step}, {run.tokens_seen:,} tokens)", flush=True)
        if state["loader"] is None:
            print("data position: from the start of the new data mix (a branch)", flush=True)
        for key, (old, new) in changes.items():
            print(f"resume: {key} changed from {old!r} to {new!r}", flush=True)
        applied = {f"train.applied.{key}": value for key, value in run.applied_hyperparameters.items()}
        run.sink.set_tags({"train.resumed_from_step": run.step, **applied})
        if run.step >= run.config.train.max_steps:
            print(nothing_left_message(run.step, run.config.train.max_steps), flush=True)


def nothing_left_message(step: int, max_steps: int) -> str:
    return (
        f"nothing left to train: the run finished step {step} of train.max_steps={max_steps}; raise "
        "train.max_steps (or train.max_tokens) to train on, e.g. `pretrain resume RUN_DIR train.max_steps=N`"
    )


def load_state(run: Run, path: Path, state: dict[str, Any], *, restore_loader: bool) -> None:
    """Engine, RNG, step and tokens (and the loader's position if asked) from the checkpoint at path,
    after checking its files hold nothing but data."""
    import torch.distributed as dist

    from pipeline.training import engine
    from pipeline.training.rng import load_rng_state

    engine.verify_checkpoint(path)
    reshard = state["world_size"] != run.world_size and run.config.train.zero_stage > 0
    load_dir = path.parent / "universal" if reshard else path.parent
    if reshard and run.rank == 0:
        shutil.rmtree(load_dir, ignore_errors=True)  # debris of an interrupted conversion
        engine.convert_to_universal(path, load_dir / path.name)
    dist.barrier()
    run.applied_hyperparameters = engine.load_checkpoint(run.engine, load_dir, path.name, run.config.train)
    dist.barrier()
    if reshard and run.rank == 0:
        shutil.rmtree(load_dir)
    if restore_loader:
        run.loader.load_state_dict(state["loader"])
    load_rng_state(path, run.rank)
    run.step, run.tokens_seen, run.last_checkpoint = state["step"], state["tokens_seen"], path
