"""Hugging Face weights for `model.init_from`: which files hold them, their sha256 for the run's records,
and reading them one tensor at a time into a fresh model.

Safetensors files are memory-mapped and read tensor by tensor (a sharded checkpoint through its
index), so loading never holds a second copy of the model; pytorch_model.bin is a pickle, loaded with
`weights_only=True` and mmap. The name mapping (fused qkv, Conv1D transposes, base-model prefixes,
tied aliases) is models/hf.py's; under ZeRO-3 the engine gathers one module at a time and only rank 0
reads (pipeline/training/engine.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from models import check_hf_tensor_names, hf_tensor_names, parameter_from_hf
from pipeline.errors import CheckpointError
from pipeline.run.artifacts import file_sha256

# In the order transformers prefers them; an index names the shards of a sharded checkpoint.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def weight_files(directory: str | Path) -> list[Path]:
    """The files holding the weights of an HF model directory: one file, or an index's shards."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise CheckpointError(f"{path}: the shards {missing} are missing; download the whole model directory")
        return [path, *(directory / shard for shard in shards)]
    raise CheckpointError(
        f"model.init_from={directory}: no weights ({', '.join(WEIGHT_FILES)}); save the model into it with "
        "transformers' `save_pretrained` (or download all of its files)"
    )


def weights_record(directory: str | Path) -> dict:
    """{"path", "sha256", "files": {name: sha256}}: what a run started from. The sha256 is that of the
    one weight file, or over the files' own hashes for a sharded checkpoint."""
    files = {path.name: file_sha256(path) for path in weight_files(directory)}
    digest = next(iter(files.values())) if len(files) == 1 else file_sha256_of_hashes(files)
    return {"path": str(Path(directory).resolve()), "sha256": digest, "files": files}


def file_sha256_of_hashes(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@contextmanager
def open_weights(directory: str | Path) -> Iterator[dict[str, Callable[[], torch.Tensor]]]:
    """{stored tensor name: a function reading that tensor}, for the files of weight_files(directory)."""
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    with ExitStack() as stack:
        for path in weight_files(directory):
            if path.name.endswith(".index.json"):
                continue
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                handle = stack.enter_context(safe_open(str(path), framework="pt"))
                names = handle.keys()  # a safe_open handle is no mapping
                readers |= {name: lambda name=name, handle=handle: handle.get_tensor(name) for name in names}
            else:
                state = _load_pickled(path)
                readers |= {name: lambda name=name, state=state: state[name] for name in state}
        yield readers


def _load_pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # unpickling errors have many types
        raise CheckpointError(
            f"{path}: cannot be loaded as plain tensors ({type(exc).__name__}: {exc}); convert the model "
            "to safetensors (`save_pretrained(DIR, safe_serialization=True)`)"
        ) from None


class HFWeights:
    """An HF checkpoint's tensors for one model of ours: checked names, and our parameters built from them."""

    def __init__(self, model: nn.Module, readers: dict[str, Callable[[], torch.Tensor]], source: str | Path):
        self.config, self.readers = model.config, readers
        self.names = hf_tensor_names(model.config, readers)
        try:
            check_hf_tensor_names(model, self.names)
        except ValueError as exc:
            raise CheckpointError(
                f"model.init_from={source}: {exc}; its weights do not match its config.json"
            ) from None

    def parameter(self, name: str) -> torch.Tensor:
        """Our parameter `name` (its full name in the model) from the checkpoint's tensors."""
        return parameter_from_hf(self.config, name, lambda hf_name: self.readers[self.names[hf_name]]())


@torch.no_grad()
def copy_parameters(weights: HFWeights, named: Iterator[tuple[str, nn.Parameter]]) -> None:
    """Copy the checkpoint's values into the given (full name, parameter) pairs, in their dtype."""
    for name, param in named:
        value = weights.parameter(name)
        if value.shape != param.shape:
            raise CheckpointError(f"{name}: the checkpoint's shape {tuple(value.shape)} is not {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


def load_pretrained(model: nn.Module, directory: str | Path) -> None:
    """Load model.init_from's weights into a (non-partitioned) model of the same architecture."""
    with open_weights(directory) as readers:
        copy_parameters(HFWeights(model, readers, directory), model.named_parameters())
