"""Per-rank RNG states (torch CPU and CUDA, numpy, python) saved with each checkpoint.

Stored with `torch.save` as tensors and plain values only, so loading them needs no pickled code
(`weights_only=True`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
