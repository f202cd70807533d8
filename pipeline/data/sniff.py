"""What a file really holds, checked before a text or JSONL reader trusts its name.

A gzip file named `.txt` would otherwise train on garbage with one warning about invalid UTF-8. Each
file of a text or JSONL source is checked by its first bytes: compression and archive formats by
their magic numbers (the reader decompresses only what its suffix says is compressed), Parquet by
its magic, and anything else by the share of bytes that are not valid UTF-8 or are NUL. A source
whose files are all empty is named too. One line each, with the file and the fix.
"""

from __future__ import annotations

import codecs
import os

from pipeline.errors import DataError

HEAD_BYTES = 64 * 1024
# Share of a file's first bytes that may be invalid UTF-8 or NUL before it is taken for binary data
# (random bytes score about 45%, Latin-1 prose a few percent), judged on at least MIN_JUDGED_BYTES.
MAX_BINARY_SHARE = 0.25
MIN_JUDGED_BYTES = 512
MAGIC = {
    b"\x1f\x8b": ("gzip-compressed", ".gz"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", ".zst"),
    b"BZh": ("bzip2-compressed", ".bz2"),
    b"\xfd7zXZ\x00": ("xz-compressed", ".xz"),
    b"PK\x03\x04": ("a zip archive", None),
    b"PAR1": ("a Parquet file", None),
}


def check_text_files(files: list[str], label: str, position: int, kind: str) -> None:
    """Refuse files of a text/JSONL source that are compressed under a plain name, binary, or all empty."""
    compressed_names = tuple(suffix for _, suffix in MAGIC.values() if suffix)
    for path in files:
        if path.lower().endswith(compressed_names):
            continue  # decompressed by the reader
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
        problem = _problem(head, path, kind, position)
        if problem:
            raise DataError(f"{label}: {path} {problem}")
    if files and all(os.path.getsize(path) == 0 for path in files):
        raise DataError(
            f"{label}: {files[0]} is empty{' (as are all its files)' if len(files) > 1 else ''}: there is no "
            f"text to train on; point data.sources[{position}].path at files with text, or drop the source"
        )


def _problem(head: bytes, path: str, kind: str, position: int) -> str | None:
    for magic, (what, suffix) in MAGIC.items():
        if head.startswith(magic):
            if what == "a Parquet file":
                return f"is a Parquet file, read as {kind}; set data.sources[{position}].format=parquet"
            if suffix is None:
                return f"is {what}, not {kind}; extract it and point data.sources[{position}].path at its files"
            return (
                f"is {what} but its name does not say so, so it would be read as plain {kind}; rename it to "
                f"end in {suffix} (e.g. {os.path.basename(path)}{suffix}) so it is decompressed while read"
            )
    share = _binary_share(head)
    if len(head) >= MIN_JUDGED_BYTES and share > MAX_BINARY_SHARE:
        return (
            f"does not look like UTF-8 text: {share:.0%} of its first {len(head):,} bytes are invalid UTF-8 or "
            f"NUL; give text files (UTF-8), or set data.sources[{position}].format to what it holds "
            "(jsonl, parquet, saved)"
        )
    return None


def _binary_share(head: bytes) -> float:
    if not head:
        return 0.0
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text = decoder.decode(head, final=False)  # a character cut at the end of the head is not an error
    invalid = text.count("\ufffd") - head.decode("utf-8", "ignore").count("\ufffd")
    return (invalid + head.count(b"\x00")) / len(head)
