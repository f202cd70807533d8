from pathlib import Path

import pytest

from pipeline.config import SourceConfig, load_config
from pipeline.data.sources import (
    BUILTIN_STDLIB,
    corpus_identity,
    is_validation,
    resolve_files,
    resolve_format,
    stdlib_files,
    validation_rule,
)
from pipeline.errors import DataError


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


def test_glob_lists_files_in_sorted_order(tmp_path):
    for name in ["b.txt", "a.txt", "c.txt"]:
        (tmp_path / name).write_text(name)
    files = resolve_files(0, SourceConfig(path=str(tmp_path / "*.txt")))
    assert [Path(f).name for f in files] == ["a.txt", "b.txt", "c.txt"]


def test_builtin_stdlib_is_sorted_python_without_tests():
    files = stdlib_files(0, SourceConfig(path=BUILTIN_STDLIB))
    assert len(files) > 300 and all(f.endswith(".py") for f in files)
    assert not any("/test/" in f or "/site-packages/" in f for f in files)


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match=r"data.sources\[0\] \(.*nope.txt\): the path does not exist"):
        resolve_files(0, SourceConfig(path=str(tmp_path / "nope.txt")))
    with pytest.raises(DataError, match="matches no files"):
        resolve_files(0, SourceConfig(path=str(tmp_path / "*.jsonl")))


def test_unknown_builtin():
    with pytest.raises(DataError, match="unknown builtin corpus; the only one is `builtin:python-stdlib`"):
        resolve_files(0, SourceConfig(path="builtin:rust-std"))


def test_validation_split_is_stable_and_near_permille():
    texts = [f"document {i}" for i in range(20000)]
    val = sum(is_validation(t, 50) for t in texts)
    assert 800 < val < 1200
    assert [is_validation(t, 50) for t in texts[:100]] == [is_validation(t, 50) for t in texts[:100]]
    assert not any(is_validation(t, 0) for t in texts)


def _rule(tmp_path, files: int, **source):
    for i in range(files):
        (tmp_path / f"f{i}.txt").write_text("a\nb\n")
    config = load_config(None, [f"data.sources=[{{path: '{tmp_path}/*.txt'}}]"])
    spec = SourceConfig(path=str(tmp_path / "*.txt"), **source)
    return validation_rule(0, spec, config.data, resolve_files(0, spec))


def test_auto_validation_takes_the_tail_of_few_whole_file_documents(tmp_path):
    assert _rule(tmp_path, 1) == "tail"  # nanoGPT's input.txt
    assert _rule(tmp_path, 1, text_unit="line") == "hash"
    assert _rule(tmp_path, 1, validation="hash") == "hash"
    assert _rule(tmp_path, 600) == "hash"  # 600 files x 20 per mille: 12 expected validation documents


def test_tail_on_a_format_it_cannot_cut_names_the_key(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
    spec = SourceConfig(path=str(tmp_path / "x.parquet"), validation="tail")
    data = load_config(None, [f"data.sources=[{{path: {tmp_path}/x.parquet}}]"]).data
    with pytest.raises(DataError, match=r"validation `tail` cuts .* set data.sources.0.validation=hash"):
        validation_rule(0, spec, data, resolve_files(0, spec))


def test_corpus_identity_changes_when_a_file_changes(tmp_path):
    text_file = tmp_path / "a.txt"
    text_file.write_text("some content")
    config = load_config(None, [f"data.sources=[{{path: {text_file}}}]"])
    before = corpus_identity(config.data)
    text_file.write_text("different and longer content")
    assert corpus_identity(config.data) != before


def test_the_split_keeps_near_copies_together_and_spreads_the_rest():
    """The MinHash split key: a document and its near-copy (one line changed) share a key, so they share a
    split; unrelated documents get independent keys, and about val_permille of them go to validation."""
    import random

    from pipeline.data.sources import split_key

    rng = random.Random(0)
    base = [" ".join(f"w{rng.randrange(5000)}" for _ in range(12)) for _ in range(60)]
    same = 0
    for trial in range(50):
        lines = [f"{line} {trial}" for line in base]
        copy = list(lines)
        copy[rng.randrange(len(copy))] = "an edited line with other words entirely"
        same += split_key("\n".join(lines)) == split_key("\n".join(copy))
    assert same >= 45  # Jaccard ~0.96: the same key with probability ~0.96
    keys = {split_key(" ".join(f"w{rng.randrange(10**6)}" for _ in range(50))) for _ in range(2000)}
    assert len(keys) == 2000
    share = sum(is_validation(" ".join(f"x{rng.randrange(10**6)}" for _ in range(30)), 100) for _ in range(4000))
    assert 300 < share < 500  # 10% +- sampling noise
