import json
import tempfile

import numpy as np
import pytest

from pipeline.artifacts import read_manifest
from pipeline.config import load_config
from pipeline.data import file_sha256, read_index, token_dtype
from pipeline.errors import DataError
from pipeline.shard import shard_stage
from pipeline.sources import is_validation
from pipeline.tokenizer import load_tokenizer


def write_corpus(directory, documents=60):
    """A JSONL source and a text source (one document per paragraph), small enough to shard in a second."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {"text": f"def function_{i}(x):\n    return x * {i}  # document {i} <|endoftext|> [SEP]\n"}
        for i in range(documents)
    ]
    (directory / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    paragraphs = [f"Paragraph {i} says hello, wörld {i * i}." for i in range(documents // 2)]
    (directory / "prose.txt").write_bytes("\n\n".join(paragraphs).encode() + b"\n\nbroken \xff byte\n")
    return [row["text"] for row in rows], paragraphs + ["broken \ufffd byte\n"]


def corpus_config(workdir, corpus_dir, *overrides):
    sources = (
        f"data.sources=[{{path: {corpus_dir}/code.jsonl, weight: 3}}, "
        f"{{path: {corpus_dir}/prose.txt, text_unit: paragraph}}]"
    )
    return load_config(
        None,
        [
            f"run.workdir={workdir}",
            sources,
            "data.val_permille=200",
            "data.shard_tokens=300",
            "data.num_workers=1",
            "tokenizer.vocab_size=300",
            *overrides,
        ],
    )


@pytest.fixture
def corpus(tmp_path):
    return tmp_path / "corpus", write_corpus(tmp_path / "corpus")


def shard_documents(shard_dir, shards, separator_id):
    """Token lists of the documents in the given shards, split at the separator."""
    tokens = np.concatenate([np.fromfile(shard_dir / s["file"], dtype=np.uint16) for s in shards])
    ends = np.flatnonzero(tokens == separator_id)
    return [tokens[start + 1 if i else 0 : end].tolist() for i, (start, end) in enumerate(zip(np.r_[-1, ends], ends))]


def test_shards_hold_every_document_once_in_order(workdir, corpus):
    corpus_dir, (code, prose) = corpus
    result = shard_stage(corpus_config(workdir, corpus_dir))
    index = read_index(result.path)
    tokenizer = load_tokenizer(result.path / "tokenizer")
    for split in ("train", "val"):
        for source, texts in enumerate([code, prose]):
            shards = [s for s in index["splits"][split]["shards"] if s["source"] == source]
            expected = [t for t in texts if is_validation(t, 200) == (split == "val")]
            decoded = [
                tokenizer.decode(ids, skip_special_tokens=False)
                for ids in shard_documents(result.path, shards, index["separator_id"])
            ]
            assert decoded == expected  # literal "<|endoftext|>" in a document is not the separator
            assert sum(s["documents"] for s in shards) == len(expected)
            assert sum(s["source_bytes"] for s in shards) == sum(len(t.encode()) for t in expected)


def test_index_format(workdir, corpus):
    corpus_dir, _ = corpus
    result = shard_stage(corpus_config(workdir, corpus_dir))
    index = read_index(result.path)
    assert index["format_version"] == 1 and index["family"] == "gpt" and index["dtype"] == "uint16"
    assert index["vocab_size"] == load_tokenizer(result.path / "tokenizer").get_vocab_size()
    assert index["tokenizer_fingerprint"] == result.manifest["inputs"]["tokenizer"] and index["separator_id"] == 0
    for split in index["splits"].values():
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        for shard in split["shards"]:
            path = result.path / shard["file"]
            assert path.stat().st_size == 2 * shard["tokens"] and file_sha256(path) == shard["sha256"]
            assert shard["tokens"] < 300 + 100  # closes at the target; documents are never split
    code, prose = index["sources"]
    assert (code["weight"], prose["weight"]) == (3, 1) and code["target_share"] == 0.75
    assert prose["invalid_utf8_bytes"] == 1 and code["invalid_utf8_bytes"] == 0
    assert code["natural_share"] + prose["natural_share"] == pytest.approx(1)
    assert {s["source"] for s in index["splits"]["train"]["shards"]} == {0, 1}  # per-source shards


def test_dtype_follows_vocabulary_size():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_rerun_reuses_tokenizer_and_shards_whatever_the_worker_count(workdir, corpus, capsys):
    corpus_dir, _ = corpus
    first = shard_stage(corpus_config(workdir, corpus_dir))
    again = shard_stage(corpus_config(workdir, corpus_dir, "data.num_workers=4", "data.verify_checksums=false"))
    assert again.reused and again.path == first.path
    changed = shard_stage(corpus_config(workdir, corpus_dir, "data.shard_tokens=500"))
    assert not changed.reused and changed.manifest["inputs"]["tokenizer"] == first.manifest["inputs"]["tokenizer"]


def test_a_source_failing_mid_stage_leaves_no_shard_directory(workdir, corpus):
    corpus_dir, _ = corpus
    with (corpus_dir / "code.jsonl").open("a") as handle:
        handle.write('{"content": "no text field"}\n')
    # A small tokenizer sample stops reading early, so the bad row surfaces while the shards are written.
    config = corpus_config(workdir, corpus_dir, "tokenizer.sample_bytes=2000")
    with pytest.raises(DataError, match=r"1 rows lack the text field `text` \(first: .*code.jsonl line 61\)"):
        shard_stage(config)
    assert len(list((workdir / "cache" / "tokenizer").iterdir())) == 1
    assert list((workdir / "cache" / "shard").iterdir()) == []


@pytest.mark.slow
def test_output_is_byte_identical_for_one_and_two_workers(tmp_path):
    import ray

    corpus_dir = tmp_path / "corpus"
    write_corpus(corpus_dir, documents=400)
    one = shard_stage(corpus_config(tmp_path / "one", corpus_dir, "data.shard_tokens=2000"))
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, logging_level="WARNING")
        try:
            two = shard_stage(
                corpus_config(tmp_path / "two", corpus_dir, "data.shard_tokens=2000", "data.num_workers=2")
            )
        finally:
            ray.shutdown()
    assert one.fingerprint == two.fingerprint  # same cache key: worker count is not an input
    files = sorted(p.relative_to(one.path) for p in one.path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert len(files) > 10 and files == sorted(
        p.relative_to(two.path) for p in two.path.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    for name in files:
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name
    assert read_manifest(two.path)["figures"]["num_workers"] == 2
