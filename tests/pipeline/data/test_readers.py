import gzip
import json
from pathlib import Path

import pytest
import zstandard

from pipeline.config import SourceConfig, load_config
from pipeline.data.partitions import plan_source
from pipeline.data.readers import PartitionReader, ReadStats, source_texts
from pipeline.data.sources import BUILTIN_STDLIB, stdlib_files
from pipeline.errors import DataError


def read(path, partition_bytes=8 << 20, **settings):
    """Every document of one source, partition after partition, and the summed read figures."""
    source = SourceConfig(path=str(path), **settings)
    data = load_config(None, [f"data.partition_bytes={partition_bytes}"]).data
    texts, total = [], ReadStats()
    for partition in plan_source(0, source, data):
        reader = PartitionReader(partition, source)
        texts += list(reader)
        for key in ("documents", "text_bytes", "invalid_utf8_bytes"):
            setattr(total, key, getattr(total, key) + getattr(reader.stats, key))
    return texts, total


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n\nnew paragraph\n", encoding="utf-8")
    return path


def test_text_units(text_file):
    assert read(text_file, text_unit="file", validation="hash")[0] == ["first line\nsecond line\n\nnew paragraph\n"]
    assert read(text_file, text_unit="line")[0] == ["first line", "second line", "new paragraph"]
    assert read(text_file, text_unit="paragraph")[0] == ["first line\nsecond line", "new paragraph"]


def test_whole_files_read_in_sorted_order(tmp_path):
    for name in ["b.txt", "a.txt", "c.txt"]:
        (tmp_path / name).write_text(name)
    assert read(tmp_path / "*.txt", validation="hash")[0] == ["a.txt", "b.txt", "c.txt"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok \xff\xfe text \xc3\n")
    texts, stats = read(path, validation="hash")
    assert texts == ["ok \ufffd\ufffd text \ufffd\n"]
    assert stats.invalid_utf8_bytes == 3


def _jsonl_bytes(rows):
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.mark.parametrize(
    "suffix,compress",
    [("", lambda b: b), (".gz", gzip.compress), (".zst", lambda b: zstandard.ZstdCompressor().compress(b))],
)
def test_jsonl_plain_and_compressed(tmp_path, suffix, compress):
    path = tmp_path / f"docs.jsonl{suffix}"
    path.write_bytes(compress(b"\xef\xbb\xbf" + _jsonl_bytes([{"body": "one", "id": 1}, {"body": "two", "id": 2}])))
    assert read(path, text_field="body")[0] == ["one", "two"]  # a byte-order mark is dropped


def test_jsonl_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n{"text": "fine"}\n')
    texts, stats = read(path)
    assert texts == ["caf\ufffd", "fine"] and stats.invalid_utf8_bytes == 1


def test_a_jsonl_row_without_the_text_field_is_named_by_its_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document {i}"} for i in range(200)]
    path.write_bytes(_jsonl_bytes(rows) + b"\n" + _jsonl_bytes([{"txt": "b"}, {"text": None}]))
    # Small partitions: the bad row sits in a later partition, and the line still counts from the file's start.
    with pytest.raises(DataError) as error:
        read(path, partition_bytes=1024)
    assert str(error.value) == (
        f"{path} line 202: no text in the field `text`; set data.sources[0].text_field to the field that holds "
        "the text, or fix or remove the row"
    )
    path.write_bytes(_jsonl_bytes(rows))  # the fix: the rows removed
    assert len(read(path, partition_bytes=1024)[0]) == 200


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(_jsonl_bytes([{"text": "a"}]) + b"{oops\n")
    with pytest.raises(DataError, match=r"docs.jsonl line 2: not valid JSON .*; fix or remove the line"):
        read(path)


def test_parquet_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    values = [f"row {i}" if i % 7 else None for i in range(1000)]
    pq.write_table(pa.table({"content": values}), path, row_group_size=100)
    source = SourceConfig(path=str(path), text_field="content")
    data = load_config(None, ["data.partition_bytes=2048"]).data
    assert len(plan_source(0, source, data)) > 2  # several row-group runs
    texts, _ = read(path, partition_bytes=2048, text_field="content")
    assert texts == [v for v in values if v]  # nulls are empty documents, skipped
    with pytest.raises(DataError, match=r"no column `text` \(columns: content\); set data.sources\[0\].text_field"):
        read(path)


def test_saved_dataset_directory_and_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x y", "z"]})}).save_to_disk(tmp_path / "ds")
    assert read(tmp_path / "ds")[0] == ["x y", "z"]
    with pytest.raises(DataError, match="no split `test` \\(splits: train\\)"):
        read(tmp_path / "ds", split="test")


def test_hub_dataset_is_read_per_data_file(tmp_path, monkeypatch):
    """A hub dataset as `datasets` resolves it; a local folder stands in for the hub (no network in tests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for part in range(2):
        rows = [f"file {part} row {i}" for i in range(5)]
        pq.write_table(pa.table({"text": rows}), tmp_path / "hub" / "data" / f"train-{part}.parquet")
    source = SourceConfig(path=f"hf:{tmp_path / 'hub'}")
    partitions = plan_source(0, source, load_config(None, []).data)
    assert len(partitions) == 2 and partitions[0].module == "parquet"
    texts = [t for p in partitions for t in PartitionReader(p, source)]
    assert texts == [f"file {part} row {i}" for part in range(2) for i in range(5)]


def test_builtin_stdlib_one_document_per_file():
    texts, stats = read(BUILTIN_STDLIB, text_unit="line")  # text_unit is ignored: one document per file
    non_blank = [f for f in stdlib_files(0, SourceConfig(path=BUILTIN_STDLIB)) if Path(f).read_text("utf-8").strip()]
    assert stats.documents == len(non_blank) and texts[0] == Path(non_blank[0]).read_text(encoding="utf-8")


def test_max_documents_caps_each_source_across_partitions(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    config = load_config(
        None,
        [
            f"data.sources=[{{path: {path}, text_unit: line}}, {{path: {BUILTIN_STDLIB}}}]",
            "data.max_documents=300",
            "data.partition_bytes=1024",  # about 120 lines per partition: the cap spans three
        ],
    )
    assert list(source_texts(0, config.data)) == [f"line {i}" for i in range(300)]
    assert len(list(source_texts(1, config.data))) == 300


def test_blank_documents_are_skipped(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    assert read(tmp_path / "blank.txt", validation="hash")[0] == []
