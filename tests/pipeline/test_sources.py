import gzip
import json
from pathlib import Path

import pytest
import zstandard

from pipeline.config import SourceConfig, load_config
from pipeline.errors import DataError
from pipeline.sources import (
    BUILTIN_STDLIB,
    SourceReader,
    corpus_identity,
    is_validation,
    iter_corpus,
    resolve_format,
    stdlib_files,
)


def read(path, **settings):
    reader = SourceReader(0, SourceConfig(path=str(path), **settings))
    return [d.text for d in reader], reader.stats


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n\nnew paragraph\n", encoding="utf-8")
    return path


def test_text_units(text_file):
    assert read(text_file, text_unit="file")[0] == ["first line\nsecond line\n\nnew paragraph\n"]
    assert read(text_file, text_unit="line")[0] == ["first line", "second line", "new paragraph"]
    assert read(text_file, text_unit="paragraph")[0] == ["first line\nsecond line", "new paragraph\n"]


@pytest.mark.parametrize(
    "path,expected",
    [
        ("hf:wikitext", "hub"),
        ("builtin:python-stdlib", "builtin"),
        ("a/*.jsonl.zst", "jsonl"),
        ("x.json.gz", "jsonl"),
        ("x.parquet", "parquet"),
        ("notes/*.md", "text"),
    ],
)
def test_format_from_prefix_and_extension(path, expected):
    assert resolve_format(SourceConfig(path=path)) == expected


def test_glob_reads_files_in_sorted_order(tmp_path):
    for name in ["b.txt", "a.txt", "c.txt"]:
        (tmp_path / name).write_text(name)
    assert read(tmp_path / "*.txt")[0] == ["a.txt", "b.txt", "c.txt"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok \xff\xfe text \xc3\n")
    texts, stats = read(path)
    assert texts == ["ok \ufffd\ufffd text \ufffd\n"]
    assert stats.invalid_utf8_bytes == 3
    assert "replaced 3 invalid UTF-8 bytes" in capsys.readouterr().err


def _jsonl_bytes(rows):
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.mark.parametrize(
    "suffix,compress",
    [("", lambda b: b), (".gz", gzip.compress), (".zst", lambda b: zstandard.ZstdCompressor().compress(b))],
)
def test_jsonl_plain_and_compressed(tmp_path, suffix, compress):
    path = tmp_path / f"docs.jsonl{suffix}"
    path.write_bytes(compress(_jsonl_bytes([{"body": "one", "id": 1}, {"body": "two", "id": 2}])))
    assert resolve_format(SourceConfig(path=str(path))) == "jsonl"
    assert read(path, text_field="body")[0] == ["one", "two"]


def test_jsonl_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n{"text": "fine"}\n')
    texts, stats = read(path)
    assert texts == ["caf\ufffd", "fine"] and stats.invalid_utf8_bytes == 1


def test_jsonl_rows_without_text_field_name_count_and_first_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(_jsonl_bytes([{"text": "a"}]) + b"\n" + _jsonl_bytes([{"txt": "b"}, {"text": None}]))
    with pytest.raises(DataError, match=r"2 rows lack the text field `text` \(first: .*docs.jsonl line 3\)"):
        read(path)


def test_parquet_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta"]}), path)
    assert read(path, text_field="content")[0] == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"no column `text` \(columns: content\); set data.sources\[0\].text_field"):
        read(path)


def test_saved_dataset_directory_and_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x y", "z"]})}).save_to_disk(tmp_path / "ds")
    assert resolve_format(SourceConfig(path=str(tmp_path / "ds"))) == "saved"
    assert read(tmp_path / "ds")[0] == ["x y", "z"]
    with pytest.raises(DataError, match="no split `test` \\(splits: train\\)"):
        read(tmp_path / "ds", split="test")


def test_builtin_stdlib_is_sorted_python_without_tests():
    files = stdlib_files(0, SourceConfig(path=BUILTIN_STDLIB))
    assert len(files) > 300 and all(f.endswith(".py") for f in files)
    assert not any("/test/" in f or "/site-packages/" in f for f in files)
    texts, stats = read(BUILTIN_STDLIB, text_unit="line")  # text_unit is ignored: one document per file
    non_blank = [f for f in files if Path(f).read_text(encoding="utf-8").strip()]
    assert stats.documents == len(non_blank) and texts[0] == Path(non_blank[0]).read_text(encoding="utf-8")


def test_max_documents_caps_each_source(tmp_path, text_file):
    config = load_config(
        None,
        [f"data.sources=[{{path: {text_file}, text_unit: line}}, {{path: {BUILTIN_STDLIB}}}]", "data.max_documents=2"],
    )
    documents = list(iter_corpus(config.data))
    assert [(d.source, d.index) for d in documents] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match=r"data.sources\[0\] \(.*nope.txt\): the path does not exist"):
        read(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="matches no files"):
        read(tmp_path / "*.jsonl")


def test_source_without_documents(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(DataError, match="yields no documents"):
        read(tmp_path / "blank.txt")


def test_unknown_builtin():
    with pytest.raises(DataError, match="unknown builtin corpus; the only one is `builtin:python-stdlib`"):
        read("builtin:rust-std")


def test_validation_split_is_stable_and_near_permille():
    texts = [f"document {i}" for i in range(20000)]
    val = sum(is_validation(t, 50) for t in texts)
    assert 800 < val < 1200
    assert [is_validation(t, 50) for t in texts[:100]] == [is_validation(t, 50) for t in texts[:100]]
    assert not any(is_validation(t, 0) for t in texts)


def test_corpus_identity_changes_when_a_file_changes(text_file):
    config = load_config(None, [f"data.sources=[{{path: {text_file}}}]"])
    before = corpus_identity(config.data)
    text_file.write_text("different and longer content")
    assert corpus_identity(config.data) != before
