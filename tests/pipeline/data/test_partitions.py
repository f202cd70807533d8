import json
import random

import pytest

from pipeline.config import SourceConfig, load_config
from pipeline.data.partitions import plan_source
from pipeline.data.readers import PartitionReader


def plan(path, partition_bytes, val_permille=20, **settings):
    source = SourceConfig(path=str(path), **settings)
    data = load_config(None, [f"data.partition_bytes={partition_bytes}", f"data.val_permille={val_permille}"]).data
    return source, plan_source(0, source, data)


def documents(source, partitions):
    return [text for p in partitions for text in PartitionReader(p, source)]


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """Text with lines and paragraphs of very different lengths, blank runs, CRLF and multi-byte characters."""
    rng = random.Random(0)
    lines = []
    for i in range(3000):
        kind = rng.random()
        lines.append("" if kind < 0.15 else ("   " if kind < 0.18 else f"ünï {i} " + "x" * rng.randrange(0, 400)))
    directory = tmp_path_factory.mktemp("ragged")
    (directory / "text.txt").write_bytes("\r\n".join(lines).encode())
    rows = [{"text": line or None} for line in lines]
    (directory / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.mark.parametrize("unit", ["line", "paragraph"])
@pytest.mark.parametrize("partition_bytes", [1024, 4099, 65536, 1 << 24])
def test_cuts_never_split_a_document(ragged, unit, partition_bytes):
    source, whole = plan(ragged / "text.txt", 1 << 30, text_unit=unit)
    _, cut = plan(ragged / "text.txt", partition_bytes, text_unit=unit)
    assert len(whole) == 1 and len(cut) >= min(10, (ragged / "text.txt").stat().st_size // partition_bytes)
    assert documents(source, cut) == documents(source, whole)
    ends = [piece.end for p in cut for piece in p.pieces]
    starts = [piece.start for p in cut for piece in p.pieces]
    assert starts[1:] == ends[:-1] and ends[-1] is None  # contiguous ranges, in file order


@pytest.mark.parametrize("partition_bytes", [1024, 7777, 1 << 24])
def test_jsonl_ranges_hold_every_row_once(ragged, partition_bytes):
    source, cut = plan(ragged / "rows.jsonl", partition_bytes)
    rows = [json.loads(line)["text"] for line in (ragged / "rows.jsonl").read_text().splitlines()]
    assert documents(source, cut) == [r for r in rows if r and r.strip()]


def test_small_files_are_grouped_and_big_ones_stay_whole(tmp_path):
    for i in range(10):
        (tmp_path / f"small{i}.txt").write_text("s" * 300)
    (tmp_path / "zbig.txt").write_text("b" * 5000)
    _, partitions = plan(tmp_path / "*.txt", 1024, validation="hash")
    assert [len(p.pieces) for p in partitions] == [3, 3, 3, 1, 1]
    assert partitions[-1].pieces[0].file.endswith("zbig.txt") and partitions[-1].size == 5000


def test_one_text_file_gets_its_tail_as_validation(tmp_path):
    """nanoGPT's input.txt: one file, one document by default; the last 2% (whole lines) validate."""
    path = tmp_path / "input.txt"
    path.write_text("".join(f"line {i:04d} of the play\n" for i in range(1000)))
    source, partitions = plan(path, 1 << 20)
    assert [p.split for p in partitions] == ["train", "val"]
    head, tail = documents(source, partitions)
    assert head + tail == path.read_text() and tail.startswith("line ") and tail.count("\n") == 20


def test_tail_of_line_documents_and_of_a_one_line_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"row {i}\n" for i in range(5000)))
    source, partitions = plan(path, 4096, val_permille=100, text_unit="line", validation="tail")
    splits = [p.split for p in partitions]
    assert splits == sorted(splits, key=["train", "val"].index) and "val" in splits
    val = [t for p in partitions if p.split == "val" for t in PartitionReader(p, source)]
    lines = [f"row {i}" for i in range(5000)]
    assert val == lines[len(lines) - len(val) :]  # a suffix of whole lines: the last 10% of the bytes
    assert sum(len(t) + 1 for t in val) == pytest.approx(0.1 * path.stat().st_size, abs=10)
    line = " ".join(f"wörd{i}" for i in range(1000))  # one line: cut by bytes, after a space
    (tmp_path / "one.txt").write_text(line)
    source, partitions = plan(tmp_path / "one.txt", 1 << 20, val_permille=100)
    assert [p.split for p in partitions] == ["train", "val"]
    head, tail = (next(iter(PartitionReader(p, source))) for p in partitions)
    assert (
        head + tail == line
        and head.endswith(" ")
        and len(tail.encode()) == pytest.approx(0.1 * len(line.encode()), abs=12)
    )
