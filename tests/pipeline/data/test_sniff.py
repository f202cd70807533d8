"""Files that are not what their source says are refused before anything reads them, each in one line
naming the file and the fix; doing what the line says then works."""

from __future__ import annotations

import bz2
import gzip
import os
import zipfile

import pytest

from pipeline.config import SourceConfig, load_config
from pipeline.data.partitions import plan_source
from pipeline.data.readers import PartitionReader
from pipeline.data.sources import resolve_files
from pipeline.errors import DataError

TEXT = "".join(f"def function_{i}(x):\n    return x * {i}\n\n" for i in range(200))


def documents(path, **settings) -> list[str]:
    source = SourceConfig(path=str(path), validation="hash", **settings)
    data = load_config(None).data
    return [text for partition in plan_source(0, source, data) for text in PartitionReader(partition, source)]


@pytest.mark.parametrize("compress, suffix", [(gzip.compress, ".gz"), (bz2.compress, ".bz2")])
def test_a_compressed_file_named_as_text_is_refused_and_renaming_it_as_told_reads_it(tmp_path, compress, suffix):
    path = tmp_path / "corpus.txt"
    path.write_bytes(compress(TEXT.encode()))
    with pytest.raises(DataError) as error:
        resolve_files(0, SourceConfig(path=str(path)))
    message = str(error.value)
    assert message.startswith(f"data.sources[0] ({path}): {path} is ") and "\n" not in message
    assert f"rename it to end in {suffix} (e.g. corpus.txt{suffix})" in message
    renamed = path.rename(tmp_path / f"corpus.txt{suffix}")
    assert documents(renamed) == [TEXT]


def test_a_parquet_file_named_jsonl_names_the_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.jsonl"
    pq.write_table(pa.table({"text": ["a document"] * 50}), path)
    with pytest.raises(DataError, match=r"is a Parquet file, read as jsonl; set data.sources\[0\].format=parquet"):
        resolve_files(0, SourceConfig(path=str(path)))
    assert documents(path, format="parquet") == ["a document"] * 50


def test_binary_data_and_archives_are_refused(tmp_path):
    binary = tmp_path / "data.txt"
    binary.write_bytes(os.urandom(4096))
    with pytest.raises(DataError, match=r"data.txt does not look like UTF-8 text: \d+% of its first 4,096 bytes"):
        resolve_files(0, SourceConfig(path=str(binary)))
    archive = tmp_path / "bundle.txt"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("a.txt", TEXT)
    with pytest.raises(DataError, match=r"bundle.txt is a zip archive, not text; extract it and point"):
        resolve_files(0, SourceConfig(path=str(archive)))


def test_text_with_some_invalid_bytes_is_still_text(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(TEXT.encode() + "café naïve".encode("latin-1") * 20)
    assert resolve_files(0, SourceConfig(path=str(path))) == [str(path)]


def test_an_empty_file_is_named_and_empty_files_among_others_are_skipped(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^data.sources\[0\] \({empty}\): {empty} is empty: there is no text"):
        resolve_files(0, SourceConfig(path=str(empty)))
    (tmp_path / "full.txt").write_text(TEXT)
    assert documents(tmp_path / "*.txt") == [TEXT]
