"""Corpus sources: what each `data.sources` item is (its format, its files, its identity) and which of
its text goes to validation.

Formats: plain text files (one document per file, line or blank-line paragraph), JSONL (also
.gz/.zst/.bz2/.xz), Parquet, a `datasets.save_to_disk` directory, a Hugging Face hub dataset, and
`builtin:python-stdlib`, the running interpreter's standard library sources, one document per file,
in sorted path order. pipeline/data/partitions.py cuts the files into partitions; pipeline/data/readers.py
reads one partition's documents.

Invalid UTF-8 in text and JSONL files is replaced by U+FFFD; a codec error handler counts the
replaced bytes so the shard stage can report them and record them in index.json.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig, SourceConfig
from pipeline.data.sniff import check_text_files
from pipeline.errors import DataError

BUILTIN_STDLIB = "builtin:python-stdlib"
HUB_PREFIX = "hf:"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")
# A source whose documents are whole files gets the tail rule when fewer than this many would be
# validation documents by hash (nanoGPT's single input.txt would get none).
MIN_HASHED_VALIDATION_DOCUMENTS = 10
# Parts of the standard library that are not the library: third-party packages and test suites
# (the latter hold deliberately broken and huge generated files).
# `encodings` and `pydoc_data` are machine-generated tables (codec maps, the help topics): dozens of
# near-copies that would leak across the split and dominate the validation windows.
STDLIB_EXCLUDED_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
TEXT_UNIT_SAMPLE_BY = {"file": "document", "line": "line", "paragraph": "paragraph"}

SHINGLE_WORDS = 5
SHINGLE_MULTIPLIER = 0x100000001B3  # FNV-1a's 64-bit prime: combines the 5 word hashes of a shingle
SHINGLE_MIXER = 0xBF58476D1CE4E5B9  # splitmix64's multiplier: spreads the combined hash over 64 bits
REPLACE_AND_COUNT = "pretrain-replace-and-count"
_replaced_bytes = [0]  # process-wide tally; a process reads one partition at a time, so deltas are per partition


def _replace_and_count(error: UnicodeDecodeError) -> tuple[str, int]:
    _replaced_bytes[0] += error.end - error.start
    return "\ufffd", error.end


codecs.register_error(REPLACE_AND_COUNT, _replace_and_count)


def is_validation(text: str, val_permille: int) -> bool:
    """Stable train/val assignment by a hash of the document's MinHash key (`split_key`): identical
    documents always share a split, and near-copies usually do (see split_key)."""
    bucket = int.from_bytes(hashlib.sha256(split_key(text)).digest()[:8], "little") % 1000
    return bucket < val_permille


def split_key(text: str) -> bytes:
    """The minimum, over the document's word 5-grams, of a 64-bit hash of the 5-gram: one MinHash value.
    Two documents whose sets of word 5-grams have Jaccard similarity J get the same key with
    probability J, so a near-copy lands in the other split with probability at most (1 - J) x 2p(1 - p)
    for a validation share p (at J = 0.9 and p = 2%: 0.4%), where a hash of the text would split them
    with probability 2p(1 - p) whatever J. Documents of fewer than 5 words hash their text."""
    words = text.split()
    if len(words) < SHINGLE_WORDS:
        return text.encode("utf-8")
    hashes = np.fromiter((zlib.crc32(word.encode("utf-8")) for word in words), dtype=np.uint64, count=len(words))
    shingles = np.zeros(len(words) - SHINGLE_WORDS + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64
        for offset in range(SHINGLE_WORDS):
            shingles = shingles * np.uint64(SHINGLE_MULTIPLIER) + hashes[offset : len(shingles) + offset]
        mixed = (shingles ^ (shingles >> np.uint64(29))) * np.uint64(SHINGLE_MIXER)
    return int(mixed.min()).to_bytes(8, "little")


def replaced_bytes() -> int:
    """Invalid UTF-8 bytes this process has replaced so far (read it before and after a partition)."""
    return _replaced_bytes[0]


def validation_rule(position: int, source: SourceConfig, data: DataConfig, files: list[str]) -> str:
    """`hash` or `tail` for this source (see SourceConfig.validation); `tail` on a format it cannot cut is
    an error naming the key."""
    kind = resolve_format(source)
    cuttable = kind == "text" or kind == "jsonl" and not files[0].lower().endswith(COMPRESSION_SUFFIXES)
    if source.validation == "auto":
        whole_files = kind == "text" and source.text_unit == "file"
        few = len(files) * data.val_permille < MIN_HASHED_VALIDATION_DOCUMENTS * 1000
        return "tail" if whole_files and few and data.val_permille > 0 else "hash"
    if source.validation == "tail" and not cuttable:
        raise DataError(
            f"{source_label(position, source)}: validation `tail` cuts plain text or uncompressed JSONL files at "
            f"a line boundary, and this source is {kind}; set data.sources.{position}.validation=hash"
        )
    return source.validation


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
    files = [os.path.abspath(f) for f in files]
    if kind in ("text", "jsonl"):
        check_text_files(files, source_label(position, source), position, kind)
    return files


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
