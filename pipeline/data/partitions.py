"""The partition plan: the corpus cut into units of parallel work, in a fixed order.

The plan depends on the input and `data.partition_bytes` alone, never on the number of workers or
nodes, so the shards built from it are the same bytes on a laptop and on a cluster. In plan order:
source after source; within a source, file after file; within a file, byte ranges.

- Plain text read by line or paragraph, and uncompressed JSONL: byte ranges of about partition_bytes,
  cut right after a line break (after a blank line for paragraphs), so no document straddles a cut.
- Whole-file documents (text read per file, the builtin stdlib corpus) and compressed files: whole
  files. Parquet: runs of consecutive row groups. `save_to_disk` directories: their Arrow files.
  Hub datasets: one partition per data file (the whole split when the builder lists none).
- Small consecutive pieces of a source are grouped up to partition_bytes.
- The `tail` validation rule cuts each file once more, at the start of its last val_permille bytes
  (moved to a line boundary); the pieces after that cut form validation-only partitions.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from pipeline.config import DataConfig, SourceConfig
from pipeline.data.sources import (
    COMPRESSION_SUFFIXES,
    HUB_PREFIX,
    resolve_files,
    resolve_format,
    source_label,
    validation_rule,
)
from pipeline.errors import DataError

SPLIT_BY_HASH = "hash"  # a partition's documents go to train or val by their text's hash


@dataclass(frozen=True)
class Piece:
    """A part of one file: bytes [start, end) of text or JSONL, row groups [start, end) of Parquet;
    end None means to the end of the file."""

    file: str
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class Partition:
    source: int  # position in data.sources
    number: int  # position among the source's partitions
    reader: str  # text-file, text-line, text-paragraph, jsonl, parquet, arrow, hub
    pieces: tuple[Piece, ...]
    split: str  # "hash", or "train"/"val" for every document of the partition (the tail rule)
    size: int  # input bytes (uncompressed, for Parquet); 0 where unknown (hub)
    module: str | None = None  # hub: the `datasets` builder that reads the data files

    @property
    def name(self) -> str:
        return f"{self.source:03d}-{self.number:05d}"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> Partition:
        return cls(**{**value, "pieces": tuple(Piece(**p) for p in value["pieces"])})


def plan_corpus(data: DataConfig) -> list[Partition]:
    return [part for position, source in enumerate(data.sources) for part in plan_source(position, source, data)]


def plan_source(position: int, source: SourceConfig, data: DataConfig) -> list[Partition]:
    kind = resolve_format(source)
    if kind == "hub":
        return _hub_partitions(position, source)
    files = resolve_files(position, source)
    rule = validation_rule(position, source, data, files)
    target = data.partition_bytes
    if kind == "parquet":
        items = [item for f in files for item in _parquet_pieces(position, source, f, target)]
        return _group(position, "parquet", items, target)
    if kind == "saved":
        return _group(position, "arrow", _arrow_pieces(position, source), target)
    reader = "jsonl" if kind == "jsonl" else f"text-{'file' if kind == 'builtin' else source.text_unit}"
    items = []
    for f in files:
        if reader != "text-file" and not f.lower().endswith(COMPRESSION_SUFFIXES):
            items += _range_pieces(f, target, paragraph=reader == "text-paragraph", permille=_tail(rule, data))
        elif rule == "tail":
            items += _tail_pieces(f, data.val_permille, paragraph=reader == "text-paragraph")
        else:
            items.append((Piece(f), SPLIT_BY_HASH, os.path.getsize(f)))
    return _group(position, reader, items, target)


def _tail(rule: str, data: DataConfig) -> int | None:
    return data.val_permille if rule == "tail" else None


def _group(position: int, reader: str, items: list[tuple[Piece, str, int]], target: int) -> list[Partition]:
    """Consecutive pieces of one split become one partition while they fit in target bytes together."""
    partitions, pieces, split, size = [], [], SPLIT_BY_HASH, 0
    for piece, piece_split, piece_size in items:
        if pieces and (piece_split != split or size + piece_size > target):
            partitions.append(Partition(position, len(partitions), reader, tuple(pieces), split, size))
            pieces, size = [], 0
        pieces.append(piece)
        split, size = piece_split, size + piece_size
    if pieces:
        partitions.append(Partition(position, len(partitions), reader, tuple(pieces), split, size))
    return partitions


def line_boundary(handle, offset: int, size: int, paragraph: bool) -> int:
    """The first offset >= `offset` that starts a line (a paragraph: follows a blank line), or size."""
    if offset <= 0:
        return 0
    handle.seek(offset - 1)  # if the byte before offset ends a line, offset itself is the boundary
    handle.readline()
    while paragraph:  # then on to just after the next blank line
        line = handle.readline()
        if not line.strip():
            break
    return min(handle.tell(), size)


def _range_pieces(path: str, target: int, paragraph: bool, permille: int | None) -> list[tuple[Piece, str, int]]:
    """Byte ranges of about target bytes cut at line boundaries; with permille (the tail rule) the
    ranges before the tail cut are training text and those after it validation text."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        tail = _tail_start(handle, size, permille, paragraph) if permille else size
        items = []
        for start, end, split in ((0, tail, "train" if permille else SPLIT_BY_HASH), (tail, size, "val")):
            while start < end:
                cut = min(line_boundary(handle, start + target, size, paragraph), end)
                items.append((Piece(path, start, None if cut == size else cut), split, cut - start))
                start = cut
    return items


def _tail_pieces(path: str, permille: int, paragraph: bool) -> list[tuple[Piece, str, int]]:
    """A whole-file document cut in two by the tail rule: the head trains, the tail validates."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        tail = _tail_start(handle, size, permille, paragraph)
        if tail in (0, size):  # one line: cut it by bytes, after a space (or between two characters)
            tail = _byte_cut(handle, size - math.ceil(size * permille / 1000), size)
    if tail in (0, size):  # too small to cut
        return [(Piece(path), "train", size)]
    return [(Piece(path, 0, tail), "train", tail), (Piece(path, tail), "val", size - tail)]


def _byte_cut(handle, point: int, size: int, window: int = 1 << 16) -> int:
    """The first offset at or after `point` that follows a space, or else starts a UTF-8 character."""
    handle.seek(point)
    data = handle.read(min(window, size - point))
    space = data.find(b" ")
    if space >= 0:
        return point + space + 1
    starts = [i for i, byte in enumerate(data) if byte & 0xC0 != 0x80]
    return point + starts[0] if starts else size


def _tail_start(handle, size: int, permille: int, paragraph: bool) -> int:
    """Where the last `permille` of a file's bytes start, moved to the next line boundary, or back to
    the start of the last line when no boundary follows (so a file of several lines always has a tail)."""
    point = size - math.ceil(size * permille / 1000)
    boundary = line_boundary(handle, point, size, paragraph)
    if boundary < size:
        return boundary
    handle.seek(0)
    data = handle.read(size)  # only for files whose last line spans the whole tail
    return data.rstrip(b"\n").rfind(b"\n") + 1


def _parquet_pieces(position: int, source: SourceConfig, path: str, target: int) -> list[tuple[Piece, str, int]]:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    columns = metadata.schema.to_arrow_schema().names
    if source.text_field not in columns:
        raise DataError(
            f"{source_label(position, source)}: {path} has no column `{source.text_field}` (columns: "
            f"{', '.join(columns)}); set data.sources[{position}].text_field"
        )
    items, first, size = [], 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= target or group == metadata.num_row_groups - 1:
            items.append((Piece(path, first, group + 1), SPLIT_BY_HASH, size))
            first, size = group + 1, 0
    return items


def _arrow_pieces(position: int, source: SourceConfig) -> list[tuple[Piece, str, int]]:
    import datasets

    label = source_label(position, source)
    try:
        saved = datasets.load_from_disk(source.path)
    except FileNotFoundError as exc:
        raise DataError(
            f"{label}: not a directory saved by `datasets.save_to_disk` ({exc}); fix data.sources[{position}].path"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        if source.split not in saved:
            raise DataError(
                f"{label}: no split `{source.split}` (splits: {', '.join(saved)}); set data.sources[{position}].split"
            )
        saved = saved[source.split]
    if source.text_field not in saved.column_names:
        raise DataError(
            f"{label}: no column `{source.text_field}` (columns: {', '.join(saved.column_names)}); "
            f"set data.sources[{position}].text_field"
        )
    files = [entry["filename"] for entry in saved.cache_files]
    return [(Piece(f), SPLIT_BY_HASH, os.path.getsize(f)) for f in files]


def _hub_partitions(position: int, source: SourceConfig) -> list[Partition]:
    """One partition per data file of the split, read by the builder's packaged module (parquet, json,
    text...); a dataset whose builder lists no data files is one partition streamed whole."""
    import datasets

    name = source.path.removeprefix(HUB_PREFIX)
    builder = datasets.load_dataset_builder(name, source.hub_config)
    data_files = builder.config.data_files or {}
    if source.split not in data_files:
        whole = Piece(name, 0, None)
        return [Partition(position, 0, "hub", (whole,), SPLIT_BY_HASH, 0, module=None)]
    return [
        Partition(position, number, "hub", (Piece(str(f)),), SPLIT_BY_HASH, 0, module=builder.name)
        for number, f in enumerate(data_files[source.split])
    ]
