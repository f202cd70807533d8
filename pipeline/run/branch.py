"""`pretrain branch RUN_DIR NEW_NAME --checkpoint TAG [KEY=VALUE ...]`: a new run that starts from another
run's checkpoint with its full state (weights, optimizer, data position, RNG), typically to decay a WSD
run early or to anneal on another data mix.

Only the schedule, the step budget, the learning rates and the data mix may differ from the parent;
anything else is refused, naming the key. The checkpoint's files are hard-linked (copied where links
cannot be made) into the new run as its own first checkpoint, whose trainer state records the branch's
config, so the branch then resumes like any run: its steps continue from the parent's, and the two
curves line up in the compare view. With a new data mix the data position starts fresh on it (the run
says so), and the parent's tokenizer is kept (tokenizer.path), so the weights keep their vocabulary.
The branch is its own MLflow run, tagged with its parent's MLflow run id and checkpoint (`branch.json`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, config_changes, load_config
from pipeline.errors import ConfigError
from pipeline.run.artifacts import atomic_write_json, atomic_write_text
from pipeline.run.guard import run_lock, writable_run_dir
from pipeline.run.rundir import BRANCH_FILE, RunState, config_path, run_dir_of
from pipeline.training.checkpoint import (
    CHECKSUMS,
    COMPLETE,
    TRAINER_STATE,
    checkpoints_dir,
    damage,
    fingerprint,
    read_trainer_state,
    resolve_checkpoint,
    seal,
)

# What a branch may change, as dotted key prefixes.
BRANCH_KEYS = (
    "run.name",
    "train.schedule",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.decay_fraction",
    "train.decay_shape",
    "train.max_steps",
    "train.max_tokens",
    "train.lr",
    "train.muon_lr",
    "data.sources",
)


def branch_checkpoint(source: Path, run_dir: Path, config: Config, *, keep_data_position: bool) -> Path:
    """Make another run's checkpoint `source` the first checkpoint of run_dir (pretrain branch): its files
    hard-linked (copied where links cannot be made), its trainer state recording `config` so that the
    branch resumes from it without a refused change, and without the loader's position unless asked."""
    target = checkpoints_dir(run_dir) / source.name
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        if file.parent == source and file.name in (COMPLETE, CHECKSUMS, TRAINER_STATE):
            continue
        (target / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target / file.relative_to(source))
        except OSError:  # another filesystem
            shutil.copy2(file, target / file.relative_to(source))
    state = read_trainer_state(source) | {"config": config.model_dump(mode="json"), "mlflow_run_id": None}
    state |= {"config_fingerprint": fingerprint(config)} | ({} if keep_data_position else {"loader": None})
    atomic_write_text(target / TRAINER_STATE, json.dumps(state, indent=1) + "\n")
    seal(target)
    return target


def branch_config(run_dir: Path, new_name: str, overrides: list[str]) -> tuple[Config, bool]:
    """(the branch's config, whether its data mix is new): the parent's config.yaml with the overrides,
    every change checked against BRANCH_KEYS."""
    parent_file = config_path(run_dir)
    parent = load_config(parent_file)
    config = load_config(parent_file, [*overrides, f"run.name={new_name}"])
    changes = config_changes(parent.model_dump(mode="json"), config)
    for key, (old, new) in changes.items():
        if not any(key == allowed or key.startswith(allowed + ".") for allowed in BRANCH_KEYS):
            raise ConfigError(
                f"{key}: a branch keeps its parent's value ({old!r}, not {new!r}); it may change only the "
                "schedule, train.max_steps / max_tokens, the learning rates and data.sources. Start a new run "
                "with model.init_from for anything else"
            )
    new_data = any(key.startswith("data.sources") for key in changes)
    if new_data and parent.tokenizer.path is None:  # a new corpus would train another tokenizer
        tokenizer_dir = RunState.load(run_dir).output("tokenizer")
        config = load_config(parent_file, [*overrides, f"run.name={new_name}", f"tokenizer.path={tokenizer_dir}"])
    return config, new_data


def prepare_branch(
    run_dir: str | Path, new_name: str, tag: str, overrides: list[str], *, echo: Callable[[str], None] = print
) -> Config:
    """Make the branch's run directory from the parent's checkpoint `tag`; returns the branch's config,
    which `run_pipeline` then runs (it resumes from that checkpoint)."""
    run_dir = Path(run_dir).resolve()
    config, new_data = branch_config(run_dir, new_name, overrides)
    target = run_dir_of(config)
    if target.exists():
        raise ConfigError(f"{target}: a run of that name exists; give the branch another NEW_NAME")
    checkpoint = resolve_checkpoint(run_dir, tag)
    problem = damage(checkpoint, check_hashes=True)
    if problem:
        raise ConfigError(f"{checkpoint}: {problem}; branch from another checkpoint")
    parent_state = read_trainer_state(checkpoint)
    with run_lock(writable_run_dir(target)):
        branch_checkpoint(checkpoint, target, config, keep_data_position=not new_data)
        atomic_write_json(
            target / BRANCH_FILE,
            {
                "parent_run_dir": str(run_dir),
                "parent_mlflow_run_id": parent_state.get("mlflow_run_id"),
                "checkpoint": checkpoint.name,
                "step": parent_state["step"],
                "new_data_mix": new_data,
            },
        )
    echo(f"branch {config.run.name}: from {checkpoint} (step {parent_state['step']})")
    if new_data:
        echo("branch: a new data mix, so the data position starts fresh on it")
    return config
