import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.shard import shard_stage
from pipeline.data.shard_index import PARTS_DIR
from pipeline.data.shards import read_index, token_dtype
from pipeline.data.sources import is_validation
from pipeline.data.tokenizer import load_tokenizer, tokenizer_stage
from pipeline.errors import DataError
from pipeline.run.artifacts import file_sha256, read_manifest

ROOT = Path(__file__).resolve().parents[3]


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
    return [row["text"] for row in rows], paragraphs + ["broken \ufffd byte"]


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
    config = corpus_config(workdir, corpus_dir, "tokenizer.sample_bytes=2000", "data.partition_bytes=2048")
    with pytest.raises(DataError, match=r"code.jsonl line 61: no text in the field `text`; set data.sources\[0\]"):
        shard_stage(config)
    assert len(list((workdir / "cache" / "tokenizer").iterdir())) == 1  # it never read the bad row
    # Bad input leaves nothing to resume: its fix changes the fingerprint.
    assert list((workdir / "cache" / "shard").iterdir()) == []


def test_a_row_without_text_fails_the_tokenizer_stage_by_the_same_rule_and_caches_nothing(tmp_path, corpus):
    corpus_dir, _ = corpus
    with (corpus_dir / "code.jsonl").open("a") as handle:
        handle.write('{"content": "no text field"}\n')
    workdir = tmp_path / "fresh"
    with pytest.raises(DataError, match=r"code.jsonl line 61: no text in the field `text`; set data.sources\[0\]"):
        tokenizer_stage(corpus_config(workdir, corpus_dir))  # the whole corpus fits in its sample
    assert not any((workdir / "cache" / "tokenizer").glob("*/tokenizer.json"))


def built_files(directory) -> dict[str, bytes]:
    """The build's outputs, without what records where and when it ran (manifest, completion records)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and p.parent.name != PARTS_DIR
    }


def test_one_text_file_gets_a_validation_split_by_its_tail(workdir, tmp_path):
    """nanoGPT's input.txt with default source options: whole lines at the end of the file validate."""
    path = tmp_path / "input.txt"
    path.write_text(
        "".join(f"First Citizen {i}:\nBefore we proceed any further, hear me speak.\n\n" for i in range(400))
    )
    config = load_config(
        None, [f"run.workdir={workdir}", f"data.sources=[{{path: {path}}}]", "tokenizer.vocab_size=300"]
    )
    index = read_index(shard_stage(config).path)
    assert index["sources"][0]["validation"] == "tail" and index["sources"][0]["documents"] == 2
    val = index["splits"]["val"]
    assert val["documents"] == 1 and val["source_bytes"] == pytest.approx(0.02 * path.stat().st_size, rel=0.1)


def test_an_empty_validation_split_fails_the_shard_stage_and_its_fix_works(workdir, tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"text": f"a short document number {i}\n" * 30}) + "\n" for i in range(4)))
    args = [f"run.workdir={workdir}", "tokenizer.vocab_size=300", "data.val_permille=1"]
    with pytest.raises(DataError) as error:
        shard_stage(load_config(None, [*args, f"data.sources=[{{path: {path}}}]"]))
    message = str(error.value)
    assert "none of the corpus's 4 documents fell into the validation split" in message
    fix = re.search(r"set (data\.sources\.0\.validation=tail)", message).group(1)
    result = shard_stage(load_config(None, [*args, f"data.sources=[{{path: {path}}}]", fix]))
    index = read_index(result.path)
    assert index["splits"]["val"]["documents"] == 1 and index["sources"][0]["validation"] == "tail"


def test_max_documents_spans_partitions(workdir, corpus):
    corpus_dir, (code, prose) = corpus
    config = corpus_config(workdir, corpus_dir, "data.partition_bytes=1024", "data.max_documents=45")
    index = read_index(shard_stage(config).path)
    assert [s["documents"] for s in index["sources"]] == [45, 31]  # the prose source has 31 paragraphs
    assert index["sources"][0]["partitions"] > 1


RESUMABLE_BUILD = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.pipeline.data.test_shard import corpus_config
from pipeline.data.shard import shard_stage
shard_stage(corpus_config(Path({workdir!r}), Path({corpus!r}), *{overrides!r}))
"""


def test_a_killed_build_resumes_from_its_complete_partitions(tmp_path):
    corpus_dir = tmp_path / "corpus"
    write_corpus(corpus_dir, documents=12000)
    overrides = ["data.partition_bytes=8192", "data.shard_tokens=1000"]
    reference = shard_stage(corpus_config(tmp_path / "reference", corpus_dir, *overrides))
    workdir = tmp_path / "killed"
    # The tokenizer is built first, so the child process only shards.
    tokenizer_stage(corpus_config(workdir, corpus_dir, *overrides))
    script = RESUMABLE_BUILD.format(root=str(ROOT), workdir=str(workdir), corpus=str(corpus_dir), overrides=overrides)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            parts = next((workdir / "cache" / "shard").glob(f".build-*/{PARTS_DIR}"), None)
            if parts is not None and len(list(parts.glob("*.json"))) >= 5:
                break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert parts is not None and child.returncode == -signal.SIGKILL, "the build finished before it was killed"
    done = sorted(parts.glob("*.json"))
    total = reference.manifest["figures"]["partitions"]
    assert 5 <= len(done) < total
    # A completed partition whose shard file was damaged afterwards is not trusted: it runs again.
    damaged = json.loads(done[0].read_text())["shards"]["train"]["shards"][0]["file"]
    with open(parts.parent / damaged, "r+b") as handle:
        handle.truncate(10)
    resumed = shard_stage(corpus_config(workdir, corpus_dir, *overrides))
    assert resumed.fingerprint == reference.fingerprint
    assert resumed.manifest["figures"]["partitions_reused"] == len(done) - 1
    assert built_files(resumed.path) == built_files(reference.path)
    assert not list((workdir / "cache" / "shard").glob(".build-*/"))


@pytest.mark.slow
def test_output_is_byte_identical_for_one_and_two_workers(tmp_path):
    import ray

    corpus_dir = tmp_path / "corpus"
    write_corpus(corpus_dir, documents=400)
    overrides = ["data.shard_tokens=2000", "data.partition_bytes=2048"]
    one = shard_stage(corpus_config(tmp_path / "one", corpus_dir, *overrides))
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, logging_level="WARNING")
        try:
            two = shard_stage(corpus_config(tmp_path / "two", corpus_dir, *overrides, "data.num_workers=2"))
        finally:
            ray.shutdown()
    assert one.fingerprint == two.fingerprint  # same cache key: worker count is not an input
    files = built_files(one.path)
    assert len(files) > 10 and files == built_files(two.path)
    assert read_manifest(two.path)["figures"]["num_workers"] == 2
    assert read_manifest(two.path)["figures"]["partitions"] == read_index(two.path)["partitions"] > 10


@pytest.mark.slow
def test_partitions_run_on_both_nodes_of_a_two_node_cluster(tmp_path, monkeypatch):
    """Two Ray nodes on this host, one CPU each: partitions land on both, and the bytes equal a 1-worker build."""
    from ray.cluster_utils import Cluster

    corpus_dir = tmp_path / "corpus"
    write_corpus(corpus_dir, documents=1200)
    overrides = ["data.shard_tokens=2000", "data.partition_bytes=4096"]
    one = shard_stage(corpus_config(tmp_path / "one", corpus_dir, *overrides))
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:
        monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # where the cluster notes its address (else /tmp/ray)
        Path(ray_tmp, "ray").mkdir()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": f"{ray_tmp}/ray"})
        try:
            cluster.add_node(num_cpus=1, temp_dir=f"{ray_tmp}/ray")
            cluster.wait_for_nodes()
            config = corpus_config(
                tmp_path / "two", corpus_dir, *overrides, "data.num_workers=2", f"cluster.address={cluster.address}"
            )
            two = shard_stage(config, tokenizer_stage(config))
        finally:
            cluster.shutdown()
    records = [json.loads(p.read_text()) for p in (two.path / PARTS_DIR).glob("*.json")]
    files_by_node: dict[str, list[str]] = {}
    for record in records:
        for split in ("train", "val"):
            files_by_node.setdefault(record["worker"]["node"], []).extend(
                s["file"] for s in record["shards"][split]["shards"]
            )
    assert len(files_by_node) == 2 and all(files_by_node.values()), files_by_node
    assert two.manifest["figures"]["nodes"] == 2
    assert built_files(one.path) == built_files(two.path)


@pytest.mark.slow
def test_a_bad_line_read_in_a_ray_task_is_one_console_line_and_its_fix_works(tmp_path):
    corpus_dir = tmp_path / "corpus"
    write_corpus(corpus_dir, documents=600)
    code = corpus_dir / "code.jsonl"
    lines = code.read_text().splitlines(keepends=True)
    good, lines[450] = lines[450], '{"text": "unterminated\n'
    code.write_text("".join(lines))
    command = [sys.executable, "-m", "launch.cli", "shard", str(ROOT / "configs" / "gpt-tiny.yaml")]
    overrides = [
        f"run.workdir={tmp_path / 'work'}",
        f"data.sources=[{{path: {code}}}, {{path: {corpus_dir}/prose.txt, text_unit: paragraph}}]",
        "data.num_workers=2",
        "data.partition_bytes=4096",
        "data.val_permille=200",
        "tokenizer.vocab_size=300",
    ]
    failed = subprocess.run([*command, *overrides], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert failed.returncode != 0
    [line] = failed.stderr.strip().splitlines()  # no Ray or task traceback on the console
    assert f"{code} line 451: not valid JSON" in line and "fix or remove the line" in line
    code.write_text("".join([*lines[:450], good, *lines[451:]]))  # what the message says: fix the line
    fixed = subprocess.run([*command, *overrides], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "shards:" in fixed.stdout
