"""Read one partition's documents, streaming: a worker holds one document (and one Arrow batch) at a time.

Plain text and JSONL are read as bytes, line by line, and decoded with the counting error handler
(invalid UTF-8 becomes U+FFFD and is tallied); JSONL lines are parsed with `json`, Parquet with
pyarrow by row group, `save_to_disk` Arrow files through a memory map, and hub data files through
`datasets` in streaming mode. Blank documents are skipped; rows without the text field are counted,
with the place of the first, so the shard stage can name it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import fsspec

from pipeline.config import DataConfig, SourceConfig
from pipeline.data.partitions import Partition, Piece, plan_source
from pipeline.data.sources import COMPRESSION_SUFFIXES, HUB_PREFIX, REPLACE_AND_COUNT, replaced_bytes, source_label
from pipeline.errors import DataError

BOM = b"\xef\xbb\xbf"
MISSING = object()  # a row without the text field at all
ARROW_BATCH_ROWS = 1024


@dataclass
class ReadStats:
    documents: int = 0
    text_bytes: int = 0
    invalid_utf8_bytes: int = 0
    exhausted: bool = True  # False when the document limit stopped the reading

    def as_dict(self) -> dict:
        return asdict(self)


class PartitionReader:
    """Iterates a partition's non-empty documents in order, at most `limit` of them."""

    def __init__(self, partition: Partition, source: SourceConfig, limit: int | None = None):
        self.partition, self.source, self.limit = partition, source, limit
        self.stats = ReadStats()
        self._where = ("", 0, "line")  # (file, number, unit) of the row read last: for error messages

    def __iter__(self) -> Iterator[str]:
        replaced_before = replaced_bytes()
        for value in self._values():
            if value is None:  # a null text (JSON null, a Parquet null) is an empty document
                continue
            if not isinstance(value, str):  # one rule for every stage that reads: the tokenizer's too
                raise DataError(
                    f"{self._place()}: no text in the field `{self.source.text_field}`; set "
                    f"data.sources[{self.partition.source}].text_field to the field that holds the text, or fix "
                    "or remove the row"
                )
            if not value.strip():
                continue
            if self.stats.documents == self.limit:
                self.stats.exhausted = False
                break
            self.stats.documents += 1
            self.stats.text_bytes += len(value.encode("utf-8"))
            yield value
        self.stats.invalid_utf8_bytes = replaced_bytes() - replaced_before

    def _values(self) -> Iterator[object]:
        reader = self.partition.reader
        for piece in self.partition.pieces:
            if reader == "text-file":
                yield _read_piece(piece).decode("utf-8", REPLACE_AND_COUNT)
            elif reader == "text-line":
                yield from (line.rstrip(b"\r\n").decode("utf-8", REPLACE_AND_COUNT) for line in _lines(piece))
            elif reader == "text-paragraph":
                yield from _paragraphs(piece)
            elif reader == "jsonl":
                yield from self._jsonl(piece)
            elif reader == "parquet":
                yield from self._parquet(piece)
            elif reader == "arrow":
                yield from self._arrow(piece)
            else:
                yield from self._hub(piece)

    def _jsonl(self, piece: Piece) -> Iterator[object]:
        field = self.source.text_field
        for number, line in enumerate(_lines(piece), start=1):
            self._where = (piece, number, "line")
            if number == 1 and piece.start == 0:
                line = line.removeprefix(BOM)
            text = line.decode("utf-8", REPLACE_AND_COUNT)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as exc:
                raise DataError(f"{self._place()}: not valid JSON ({exc}); fix or remove the line") from None
            yield row.get(field) if isinstance(row, dict) and field in row else MISSING

    def _parquet(self, piece: Piece) -> Iterator[object]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(piece.file)
        groups = range(piece.start, piece.end if piece.end is not None else parquet.metadata.num_row_groups)
        first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(piece.start))
        batches = parquet.iter_batches(row_groups=groups, columns=[self.source.text_field])
        yield from self._rows(piece, first_row, batches)

    def _arrow(self, piece: Piece) -> Iterator[object]:
        import pyarrow as pa

        with pa.memory_map(piece.file) as mapped:
            batches = pa.ipc.open_stream(mapped)
            yield from self._rows(piece, 0, (b.select([self.source.text_field]) for b in batches))

    def _rows(self, piece: Piece, first_row: int, batches) -> Iterator[object]:
        row = first_row
        for batch in batches:
            for value in batch.column(0).to_pylist():
                row += 1
                self._where = (piece, row, "row")
                yield value

    def _hub(self, piece: Piece) -> Iterator[object]:
        import datasets

        if self.partition.module is None:
            name = self.source.path.removeprefix(HUB_PREFIX)
            rows = datasets.load_dataset(name, self.source.hub_config, split=self.source.split, streaming=True)
        else:
            rows = datasets.load_dataset(self.partition.module, data_files=[piece.file], split="train", streaming=True)
        columns = rows.column_names
        if columns is not None and self.source.text_field not in columns:
            position = self.partition.source
            raise DataError(
                f"{source_label(position, self.source)}: no column `{self.source.text_field}` (columns: "
                f"{', '.join(columns)}); set data.sources[{position}].text_field"
            )
        for number, row in enumerate(rows, start=1):
            self._where = (piece, number, "row")
            yield row.get(self.source.text_field)

    def _place(self) -> str:
        piece, number, unit = self._where
        if unit == "line" and piece.start:  # the line number counts from the start of the file
            with open(piece.file, "rb") as handle:
                for offset in range(0, piece.start, 1 << 24):
                    number += handle.read(min(1 << 24, piece.start - offset)).count(b"\n")
        return f"{piece.file} {unit} {number}"


def _read_piece(piece: Piece) -> bytes:
    with fsspec.open(piece.file, "rb", compression="infer") as handle:
        handle.seek(piece.start)
        return handle.read(-1 if piece.end is None else piece.end - piece.start)


def _lines(piece: Piece) -> Iterator[bytes]:
    """The lines (with their line breaks) of a byte range, or of a whole compressed file."""
    if piece.file.lower().endswith(COMPRESSION_SUFFIXES):
        with fsspec.open(piece.file, "rb", compression="infer") as handle:
            yield from _split_lines(handle)
        return
    with open(piece.file, "rb") as handle:
        handle.seek(piece.start)
        remaining = float("inf") if piece.end is None else piece.end - piece.start
        while remaining > 0 and (line := handle.readline()):
            remaining -= len(line)
            yield line


def _split_lines(handle, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a stream that only offers read() (some decompressors cannot iterate lines)."""
    rest = b""
    while chunk := handle.read(chunk_bytes):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from (line + b"\n" for line in lines)
    if rest:
        yield rest


def _paragraphs(piece: Piece) -> Iterator[str]:
    """Runs of non-blank lines, without their last line break."""
    lines: list[bytes] = []
    for line in _lines(piece):
        if line.strip():
            lines.append(line)
        elif lines:
            yield b"".join(lines).rstrip(b"\r\n").decode("utf-8", REPLACE_AND_COUNT)
            lines = []
    if lines:
        yield b"".join(lines).rstrip(b"\r\n").decode("utf-8", REPLACE_AND_COUNT)


def source_texts(position: int, data: DataConfig) -> Iterator[str]:
    """One source's documents in plan order, read in this process (at most data.max_documents): what
    the shard stage tokenizes, for benchmarks and checks."""
    source, left = data.sources[position], data.max_documents
    for partition in plan_source(position, source, data):
        reader = PartitionReader(partition, source, left)
        yield from reader
        if left is not None:
            left -= reader.stats.documents
            if not reader.stats.exhausted or left == 0:
                return
