"""Corpus sources: turn each `data.sources` item into a deterministic stream of documents.

Everything is read through Hugging Face `datasets` in streaming mode (nothing is copied into a
datasets cache): plain text files (one document per file, line or blank-line paragraph), JSONL
(also .gz/.zst), Parquet, a `save_to_disk` directory, a hub dataset, and `builtin:python-stdlib`,
the running interpreter's standard library sources, one document per file, in sorted path order.

Invalid UTF-8 in text and JSONL files is replaced by U+FFFD; a codec error handler counts the
replaced bytes so the shard stage can report them and record them in index.json.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec

from pipeline.config import DataConfig, SourceConfig
from pipeline.errors import DataError

BUILTIN_STDLIB = "builtin:python-stdlib"
HUB_PREFIX = "hf:"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")
# Parts of the standard library that are not the library: third-party packages and test suites
# (the latter hold deliberately broken and huge generated files).
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
TEXT_UNIT_SAMPLE_BY = {"file": "document", "line": "line", "paragraph": "paragraph"}

REPLACE_AND_COUNT = "pretrain-replace-and-count"
_replaced_bytes = [0]  # process-wide tally; sources are read one at a time, so deltas are per source


def _replace_and_count(error: UnicodeDecodeError) -> tuple[str, int]:
    _replaced_bytes[0] += error.end - error.start
    return "\ufffd", error.end


codecs.register_error(REPLACE_AND_COUNT, _replace_and_count)


@dataclass(frozen=True)
class Document:
    source: int  # position in data.sources
    index: int  # position among the source's documents
    text: str


@dataclass
class SourceStats:
    name: str
    documents: int = 0
    text_bytes: int = 0
    invalid_utf8_bytes: int = 0
    missing_text: int = 0
    first_missing_row: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("missing_text", "first_missing_row")}


def is_validation(text: str, val_permille: int) -> bool:
    """Stable train/val assignment by the text's hash: identical documents always share a split."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") % 1000
    return bucket < val_permille


def source_label(position: int, source: SourceConfig) -> str:
    return f"data.sources[{position}] ({source.path})"


def resolve_format(source: SourceConfig) -> str:
    """The reader for a source: its explicit `format`, or one decided by prefix and extension."""
    if source.format != "auto":
        return source.format
    path = source.path
    if path.startswith("builtin:"):
        return "builtin"
    if path.startswith(HUB_PREFIX):
        return "hub"
    if Path(path).is_dir():
        return "saved"
    stem = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        stem = stem.removesuffix(suffix)
    if stem.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if stem.endswith(".parquet") else "text"


def resolve_files(position: int, source: SourceConfig) -> list[str]:
    """The sorted files of a file-based source; a missing file or an empty glob is an error."""
    kind = resolve_format(source)
    if kind == "builtin":
        return stdlib_files(position, source)
    if kind == "hub":
        return []
    if kind == "saved":
        return _saved_dataset_files(position, source)
    files = sorted(f for f in glob.glob(os.path.expanduser(source.path), recursive=True) if os.path.isfile(f))
    if not files:
        what = "matches no files" if glob.has_magic(source.path) else "does not exist or is not a file"
        raise DataError(
            f"{source_label(position, source)}: the path {what} (relative paths start at "
            f"{os.getcwd()}); fix data.sources[{position}].path"
        )
    return [os.path.abspath(f) for f in files]


def stdlib_files(position: int, source: SourceConfig) -> list[str]:
    if source.path != BUILTIN_STDLIB:
        raise DataError(f"{source_label(position, source)}: unknown builtin corpus; the only one is `{BUILTIN_STDLIB}`")
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]  # prune: site-packages can be huge
        files += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda f: Path(f).relative_to(root).as_posix())


def _saved_dataset_files(position: int, source: SourceConfig) -> list[str]:
    root = Path(source.path)
    if not root.is_dir():
        raise DataError(
            f"{source_label(position, source)}: not a directory saved by "
            f"`datasets.save_to_disk`; fix data.sources[{position}].path"
        )
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def source_identity(position: int, source: SourceConfig) -> dict:
    """What a source's documents depend on, cheaply: its settings and each file's size and mtime."""
    files = resolve_files(position, source)
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    identity = {"source": source.model_dump(mode="json"), "files": stats}
    if resolve_format(source) == "builtin":
        identity["python"] = sys.version
    return identity


def corpus_identity(data: DataConfig) -> list[dict]:
    return [source_identity(i, s) for i, s in enumerate(data.sources)]


class SourceReader:
    """Iterates one source's non-empty documents in a fixed order, at most `max_documents` of them.

    When the iteration runs to its end, problems found on the way become one-line DataErrors
    (no documents, rows without the text field), and replaced invalid UTF-8 is reported.
    """

    def __init__(self, position: int, source: SourceConfig, max_documents: int | None = None):
        self.position, self.source, self.max_documents = position, source, max_documents
        self.format = resolve_format(source)
        self.files = resolve_files(position, source)
        self.stats = SourceStats(name=source.path)

    @property
    def label(self) -> str:
        return source_label(self.position, self.source)

    def __iter__(self) -> Iterator[Document]:
        texts = self._texts()
        # Opening a JSON dataset already decodes its first chunk (to infer columns) and decodes it
        # again when iterated: count from here so each replaced byte counts once.
        replaced_before = _replaced_bytes[0]
        for row_number, text in enumerate(texts, start=1):
            self.stats.invalid_utf8_bytes = _replaced_bytes[0] - replaced_before
            if not isinstance(text, str):
                self.stats.missing_text += 1
                self.stats.first_missing_row = self.stats.first_missing_row or row_number
                continue
            if not text.strip():
                continue
            yield Document(self.position, self.stats.documents, text)
            self.stats.documents += 1
            self.stats.text_bytes += len(text.encode("utf-8"))
            if self.stats.documents == self.max_documents:
                break
        self.stats.invalid_utf8_bytes = _replaced_bytes[0] - replaced_before
        self._finish()

    def _texts(self) -> Iterator[object]:
        rows = self._rows()
        columns = getattr(rows, "column_names", None)
        if columns is not None and self.source.text_field not in columns:
            raise DataError(
                f"{self.label}: no column `{self.source.text_field}` (columns: "
                f"{', '.join(columns)}); set data.sources[{self.position}].text_field"
            )
        return (row.get(self.source.text_field) for row in rows)

    def _rows(self):
        import datasets  # heavy; only readers pay for it

        if self.format in ("text", "builtin"):
            unit = "file" if self.format == "builtin" else self.source.text_unit
            return datasets.load_dataset(
                "text",
                data_files=self.files,
                sample_by=TEXT_UNIT_SAMPLE_BY[unit],
                encoding_errors=REPLACE_AND_COUNT,
                streaming=True,
                split="train",
            )
        if self.format == "jsonl":
            # The json builder only decodes (with our error handler) when the encoding is not plain
            # "utf-8"; utf-8-sig decodes the same bytes and also drops a leading byte-order mark.
            return datasets.load_dataset(
                "json",
                data_files=self.files,
                encoding="utf-8-sig",
                encoding_errors=REPLACE_AND_COUNT,
                streaming=True,
                split="train",
            )
        if self.format == "parquet":
            return datasets.load_dataset("parquet", data_files=self.files, streaming=True, split="train")
        if self.format == "saved":
            return self._saved_rows(datasets)
        name = self.source.path.removeprefix(HUB_PREFIX)
        return datasets.load_dataset(name, self.source.hub_config, split=self.source.split, streaming=True)

    def _saved_rows(self, datasets):
        try:
            saved = datasets.load_from_disk(self.source.path)
        except FileNotFoundError as exc:
            raise DataError(
                f"{self.label}: not a directory saved by `datasets.save_to_disk` ({exc}); "
                f"fix data.sources[{self.position}].path"
            ) from None
        if isinstance(saved, datasets.DatasetDict):
            if self.source.split not in saved:
                raise DataError(
                    f"{self.label}: no split `{self.source.split}` (splits: {', '.join(saved)}); "
                    f"set data.sources[{self.position}].split"
                )
            saved = saved[self.source.split]
        return saved

    def _finish(self) -> None:
        if self.stats.missing_text:
            raise DataError(
                f"{self.label}: {self.stats.missing_text} rows lack the text field "
                f"`{self.source.text_field}` (first: {self._first_missing_place()}); set "
                f"data.sources[{self.position}].text_field to the field holding the text"
            )
        if self.stats.documents == 0:
            raise DataError(
                f"{self.label}: yields no documents (all {len(self.files) or 'its'} files empty or "
                "blank); point data.sources at text or remove the source"
            )
        if self.stats.invalid_utf8_bytes:
            print(
                f"warning: {self.label}: replaced {self.stats.invalid_utf8_bytes} invalid UTF-8 bytes with U+FFFD",
                file=sys.stderr,
                flush=True,
            )

    def _first_missing_place(self) -> str:
        if self.format != "jsonl":
            return f"row {self.stats.first_missing_row}"
        return first_jsonl_line_without(self.files, self.source.text_field)


def first_jsonl_line_without(files: list[str], text_field: str) -> str:
    """`FILE line N` of the first JSONL object whose text field is missing or null (error path only)."""
    for name in files:
        with fsspec.open(name, "rt", compression="infer", encoding="utf-8", errors="replace") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip() and not isinstance(_json_or_none(line).get(text_field), str):
                    return f"{name} line {line_number}"
    return "unknown line"


def _json_or_none(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def iter_corpus(data: DataConfig, readers: list[SourceReader] | None = None) -> Iterator[Document]:
    """All sources' documents, source after source: the order shards and samples are built in."""
    for reader in readers or make_readers(data):
        yield from reader


def make_readers(data: DataConfig) -> list[SourceReader]:
    return [SourceReader(i, source, data.max_documents) for i, source in enumerate(data.sources)]
