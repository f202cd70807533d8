"""The shard build's files: per-partition shard writers and completion records, and index.json merged
from the records in plan order (see pipeline/data/shard.py for the stage and the index format)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.data.partitions import SPLIT_BY_HASH, Partition
from pipeline.data.shards import (
    INDEX_FILE,
    INDEX_FORMAT_VERSION,
    SHARD_TOKENIZER_DIR,
    SPLITS,
    token_dtype,
    tokenizer_hashes,
)
from pipeline.data.sources import COMPRESSION_SUFFIXES, resolve_format, source_label
from pipeline.errors import DataError
from pipeline.run.artifacts import atomic_write_json

PARTS_DIR = "parts"  # one completion record per partition, written after its shard files
PLAN_FILE = "plan.json"


class _Shard:
    """One shard file, written under a temp name and renamed once closed: a whole file or none."""

    def __init__(self, path: Path):
        self.path, self.temp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.handle = open(self.temp, "wb")  # noqa: SIM115 (open while the shard fills; closed by close())
        self.sha256 = hashlib.sha256()
        self.tokens = self.documents = self.source_bytes = 0

    def append(self, tokens: bytes, itemsize: int, source_bytes: int) -> None:
        self.handle.write(tokens)
        self.sha256.update(tokens)
        self.tokens += len(tokens) // itemsize
        self.documents += 1
        self.source_bytes += source_bytes

    def close(self, source: int) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temp, self.path)
        return {
            "file": self.path.name,
            "source": source,
            "tokens": self.tokens,
            "documents": self.documents,
            "source_bytes": self.source_bytes,
            "sha256": self.sha256.hexdigest(),
        }


class ShardWriter:
    """Appends one partition's documents of one split to shard files of about shard_tokens tokens each,
    named `<split>-<source>-<partition>-<n>.bin`."""

    def __init__(self, directory: Path, split: str, partition: Partition, dtype: str, shard_tokens: int):
        self.directory, self.split, self.partition = directory, split, partition
        self.itemsize, self.shard_tokens = np.dtype(dtype).itemsize, shard_tokens
        self.shards: list[dict] = []
        self._open: _Shard | None = None

    def add(self, tokens: bytes, source_bytes: int) -> None:
        if self._open is None:
            name = f"{self.split}-{self.partition.name}-{len(self.shards):03d}.bin"
            self._open = _Shard(self.directory / name)
        self._open.append(tokens, self.itemsize, source_bytes)
        if self._open.tokens >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        if self._open is not None:
            self.shards.append(self._open.close(self.partition.source))
            self._open = None

    def finish(self) -> dict:
        self._close()
        return {"shards": self.shards, **split_totals(self.shards)}


def split_totals(shards: list[dict]) -> dict:
    return {key: sum(s[key] for s in shards) for key in ("tokens", "documents", "source_bytes")}


def worker_figures(started: float, cpu_started: float, node: str) -> dict:
    """Where and how a partition ran: node, process, wall and CPU seconds, the process's peak RSS."""
    return {
        "node": node,
        "pid": os.getpid(),
        "seconds": round(time.perf_counter() - started, 3),
        "cpu_s": round(time.process_time() - cpu_started, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def load_record(directory: Path, name: str, identity: str, itemsize: int) -> dict | None:
    """A partition's completion record if it was made for `identity` and every shard file it lists is
    there with its size; else None (the partition runs again)."""
    try:
        record = json.loads((directory / PARTS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("identity") != identity:
        return None
    for split in SPLITS:
        for shard in record["shards"][split]["shards"]:
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                return None
    return record


def merge_records(
    directory: Path,
    config: Config,
    plan: list[Partition],
    records: dict[str, dict],
    *,
    vocab_size: int,
    tokenizer_fp: str,
    separator_id: int,
) -> dict:
    """index.json from the partitions' records in plan order; problems the partitions found in the
    sources (rows without text, no documents, no validation text) become one-line DataErrors."""
    ordered = [records[p.name] for p in plan if p.name in records]
    splits = {}
    for split in SPLITS:
        shards = [s for r in ordered for s in r["shards"][split]["shards"]]
        splits[split] = {"shards": shards, **split_totals(shards)}
    sources = [_source_summary(config, position, plan, ordered, splits) for position in range(len(config.data.sources))]
    _check_validation(config, splits, sources)
    index = {
        "format_version": INDEX_FORMAT_VERSION,
        "family": config.model.family,
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "tokenizer_fingerprint": tokenizer_fp,
        "separator_id": separator_id,
        "tokenizer_sha256": tokenizer_hashes(directory / SHARD_TOKENIZER_DIR),
        "shard_tokens": config.data.shard_tokens,
        "val_permille": config.data.val_permille,
        "partition_bytes": config.data.partition_bytes,
        "partitions": len(ordered),
        "splits": splits,
        "sources": sources,
    }
    atomic_write_json(directory / INDEX_FILE, index)
    return index


def _source_summary(config: Config, position: int, plan: list[Partition], ordered: list[dict], splits: dict) -> dict:
    source = config.data.sources[position]
    mine = [r for r in ordered if r["partition"]["source"] == position]
    read = {key: sum(r["read"][key] for r in mine) for key in ("documents", "text_bytes", "invalid_utf8_bytes")}
    _check_source(config, position, mine, read)
    tokens = {split: sum(s["tokens"] for s in splits[split]["shards"] if s["source"] == position) for split in SPLITS}
    all_train = sum(s["tokens"] for s in splits["train"]["shards"])
    total_weight = sum(s.weight for s in config.data.sources)
    tail = any(p.split != SPLIT_BY_HASH for p in plan if p.source == position)
    return {
        "name": config.data.source_names()[position],
        "path": source.path,
        **read,
        "weight": source.weight,
        "target_share": source.weight / total_weight,
        "natural_share": tokens["train"] / max(all_train, 1),
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "validation": "tail" if tail else "hash",
        "partitions": len(mine),
    }


def _check_source(config: Config, position: int, records: list[dict], read: dict) -> None:
    label = source_label(position, config.data.sources[position])
    if read["documents"] == 0:
        raise DataError(f"{label}: yields no documents (empty or blank); point data.sources at text or drop the source")
    if read["invalid_utf8_bytes"]:
        print(
            f"warning: {label}: replaced {read['invalid_utf8_bytes']} invalid UTF-8 bytes with U+FFFD",
            file=sys.stderr,
            flush=True,
        )


def _check_validation(config: Config, splits: dict, sources: list[dict]) -> None:
    """Training validates and evaluation scores the val split: an empty one fails here, not later."""
    if splits["val"]["tokens"]:
        return
    data = config.data
    if data.val_permille == 0:
        raise DataError("data.val_permille=0 leaves the validation split empty, and training validates: set it to 1+")
    cuttable = [
        i
        for i, s in enumerate(data.sources)
        if sources[i]["validation"] == "hash"
        and resolve_format(s) in ("text", "jsonl")
        and not s.path.lower().endswith(COMPRESSION_SUFFIXES)
    ]
    fix = ""
    if cuttable:
        fix = f"set data.sources.{cuttable[0]}.validation=tail (its last {data.val_permille}‰ validates) or "
    documents = sum(s["documents"] for s in sources)
    rules = " and ".join(sorted({s["validation"] for s in sources}))
    raise DataError(
        f"none of the corpus's {documents} documents fell into the validation split (data.val_permille="
        f"{data.val_permille}, by {rules}); {fix}raise data.val_permille"
    )
