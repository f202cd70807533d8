"""The shard format: a directory of flat token files and `index.json`, and the checks that it is whole.

    <shard_dir>/
        index.json        format version, family, vocab size, dtype, separator id, tokenizer fingerprint and
                          file hashes, per split the shard files (tokens, sha256) and per source its figures
        tokenizer/        the copy of the tokenizer that made the token ids
        train-*.bin, val-*.bin   uint16 (or uint32 for vocabularies above 65,536) token ids

Written by the shard stage (shard.py, shard_index.py); read by the loader (loader.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.run.artifacts import file_sha256

INDEX_FILE = "index.json"
SHARD_TOKENIZER_DIR = "tokenizer"  # the shards' copy of the tokenizer that made them
INDEX_FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids below 65536; larger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"{shard_dir}: no {INDEX_FILE}, so this is not a shard directory; build one with `pretrain shard CONFIG`"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); rebuild the shards with `pretrain shard CONFIG`") from None
    if index.get("format_version") != INDEX_FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {index.get('format_version')!r} is not the supported "
            f"{INDEX_FORMAT_VERSION}; rebuild the shards with `pretrain shard CONFIG`"
        )
    return index


def check_shard_files(shard_dir: Path, index: dict, split: str, verify_checksums: bool) -> None:
    """Every shard of the split exists with the size index.json states (and its sha256 if asked)."""
    itemsize = np.dtype(index["dtype"]).itemsize
    fix = f"the shard directory {shard_dir} does not match its {INDEX_FILE}; rebuild it with `pretrain shard CONFIG`"
    for shard in index["splits"][split]["shards"]:
        path = shard_dir / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {shard['file']} is missing: {fix}")
        size, expected = path.stat().st_size, shard["tokens"] * itemsize
        if size != expected:
            raise DataError(
                f"shard {shard['file']} has {size} bytes but {INDEX_FILE} says {shard['tokens']} "
                f"tokens ({expected} bytes): {fix}"
            )
        if verify_checksums and file_sha256(path) != shard["sha256"]:
            raise DataError(f"shard {shard['file']} fails its sha256 check (corrupt or modified): {fix}")


def verify_shards(shard_dir: str | Path, verify_checksums: bool) -> dict:
    """The whole shard directory is usable: index.json, every split's shard sizes (and sha256 when
    asked) and the tokenizer copy. Done once per run, by the driver (or rank 0 under torchrun), before
    any rank reads; returns the index. DataError names the first bad file and the fix."""
    shard_dir = Path(shard_dir)
    index = read_index(shard_dir)
    for split in index["splits"]:
        check_shard_files(shard_dir, index, split, verify_checksums)
    check_tokenizer_files(shard_dir, index)
    return index


def tokenizer_hashes(tokenizer_dir: Path) -> dict[str, str]:
    """{file name: sha256} of a tokenizer directory (index.json records those of the shards' copy)."""
    return {path.name: file_sha256(path) for path in sorted(Path(tokenizer_dir).iterdir()) if path.is_file()}


def check_tokenizer_files(shard_dir: Path, index: dict) -> None:
    """The shards' tokenizer copy is the one that made the token ids: an edited or missing file would
    decode (or, for BERT, mask) with other ids. Small files: always checked. Shard directories written
    before index.json recorded the hashes have nothing to check against."""
    directory = shard_dir / SHARD_TOKENIZER_DIR
    fix = "restore it, or rebuild the shards with `pretrain shard CONFIG` so they match the tokenizer"
    for name, expected in index.get("tokenizer_sha256", {}).items():
        path = directory / name
        if not path.is_file():
            raise DataError(f"tokenizer file {path} is missing; the shards were made with it: {fix}")
        if file_sha256(path) != expected:
            raise DataError(
                f"tokenizer file {path} was changed after the shards were made with it (sha256 "
                f"differs from {INDEX_FILE}): {fix}"
            )
