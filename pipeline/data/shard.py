"""Shard stage: the corpus -> train/val token shards + index.json, one Ray task per input partition.

The driver only plans and merges. It cuts the corpus into partitions (pipeline/data/partitions.py) and
records the plan in the build directory (`plan.json`). Each partition is one task on any node: it
reads its partition, sends each document to train or val (by the source's validation rule), tokenizes
it with the tokenizer loaded once per worker process, appends the separator, and writes its own shard
files of at most data.shard_tokens tokens (documents are never split) into the build directory,
which sits on storage every node sees. It then writes a completion record `parts/<partition>.json`
and returns that record: metadata only, never text or tokens. The driver merges the records into
index.json in plan order, so the bytes are the same for any number of workers or nodes.

A killed build leaves its build directory (`cache/shard/.build-<fingerprint>`); the rerun skips
every partition whose completion record and files are intact. Shard files are written under temp
names and renamed when complete, and a record is written only after its files, so nothing
half-written is trusted.

index.json (format 1): format_version, family, vocab_size, dtype (uint16 if the vocabulary fits,
else uint32), tokenizer_fingerprint, tokenizer_sha256, separator_id, shard_tokens, val_permille,
partition_bytes, partitions; splits.{train,val}: shards [{file, source, tokens, documents,
source_bytes, sha256}] and totals (tokens, documents, source_bytes); sources [{name, weight,
target_share, natural_share, documents, train_tokens, val_tokens, text_bytes, invalid_utf8_bytes,
validation, partitions}]. The shard directory also holds a copy of the tokenizer in `tokenizer/`.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, SourceConfig
from pipeline.data.partitions import SPLIT_BY_HASH, Partition, plan_corpus
from pipeline.data.readers import PartitionReader
from pipeline.data.shard_index import PARTS_DIR, PLAN_FILE, ShardWriter, load_record, merge_records, worker_figures
from pipeline.data.shards import SHARD_TOKENIZER_DIR, SPLITS, token_dtype, verify_shards
from pipeline.data.sources import corpus_identity, is_validation
from pipeline.data.special_tokens import special_token_ids
from pipeline.data.tokenizer import load_tokenizer, tokenizer_stage, vocab_rows
from pipeline.run.artifacts import StageResult, atomic_write_json, build_stage, canonical_json, fingerprint
from pipeline.run.runtime import current_node, run_tasks

# 4: one task per input partition, each writing its own shard files; 5: the split by MinHash key,
# source names; 6: special tokens by role (a BOS before each document where the tokenizer has one)
CODE_VERSION = "shard-6"


@dataclass(frozen=True)
class ShardJob:
    """Everything one partition's task needs (small and picklable: it travels to any node)."""

    partition: Partition
    source: SourceConfig
    build_dir: str
    tokenizer_dir: str
    separator_id: int
    prefix_ids: tuple[int, ...]  # before every document (GPT's bos where it differs from the separator)
    dtype: str
    val_permille: int
    shard_tokens: int
    limit: int | None  # data.max_documents left for this source, or None

    def identity(self) -> str:
        """What the partition's output depends on: a completion record for another identity is stale."""
        return canonical_json([self.partition.as_dict(), self.limit])


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(tokenizer_dir: str):
    """The tokenizer, loaded once per worker process (Ray reuses worker processes across tasks)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    # Documents are literal text: a "<|endoftext|>" inside one must not become the separator.
    tokenizer.encode_special_tokens = True
    return tokenizer


def shard_partition(job: ShardJob) -> dict:
    """Read, split, tokenize and write one partition; returns (and records) its metadata."""
    started, cpu_started = time.perf_counter(), time.process_time()
    tokenizer = _worker_tokenizer(job.tokenizer_dir)
    partition, directory = job.partition, Path(job.build_dir)
    reader = PartitionReader(partition, job.source, job.limit)
    writers = {split: ShardWriter(directory, split, partition, job.dtype, job.shard_tokens) for split in SPLITS}
    prefix, separator = list(job.prefix_ids), [job.separator_id]
    for text in reader:
        split = partition.split
        if split == SPLIT_BY_HASH:
            split = "val" if is_validation(text, job.val_permille) else "train"
        # No template: an existing tokenizer's post-processor would add its own [CLS]/[SEP] or <s>.
        ids = prefix + tokenizer.encode(text, add_special_tokens=False).ids + separator
        writers[split].add(np.array(ids, dtype=job.dtype).tobytes(), len(text.encode("utf-8")))
    record = {
        "identity": job.identity(),
        "partition": partition.as_dict(),
        "shards": {split: writer.finish() for split, writer in writers.items()},
        "read": reader.stats.as_dict(),
        "worker": worker_figures(started, cpu_started, current_node()),
    }
    atomic_write_json(directory / PARTS_DIR / f"{partition.name}.json", record)
    return record


def write_shards(config: Config, tokenizer_dir: Path, tokenizer_fp: str, directory: Path) -> dict:
    """Plan, tokenize every partition in parallel, merge: shard files, index.json and the tokenizer copy."""
    started, cpu_started = time.perf_counter(), time.process_time()
    data = config.data
    plan = plan_corpus(data)
    atomic_write_json(directory / PLAN_FILE, [p.as_dict() for p in plan])
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(vocab_rows(tokenizer))
    special = special_token_ids(tokenizer_dir, config.model.family)
    jobs = [
        ShardJob(
            p,
            data.sources[p.source],
            str(directory),
            str(tokenizer_dir),
            special.separator,
            special.prefix,
            dtype.name,
            data.val_permille,
            data.shard_tokens,
            data.max_documents,
        )
        for p in plan
    ]
    records = _run_jobs(config, jobs)
    _remove_unlisted_files(directory, records)
    shutil.copytree(tokenizer_dir, directory / SHARD_TOKENIZER_DIR, ignore=shutil.ignore_patterns("manifest.json"))
    index = merge_records(
        directory,
        config,
        plan,
        records,
        vocab_size=vocab_rows(tokenizer),
        tokenizer_fp=tokenizer_fp,
        separator_id=jobs[0].separator_id,
    )
    seconds = time.perf_counter() - started
    tokens = sum(index["splits"][split]["tokens"] for split in SPLITS)
    workers = [record["worker"] for record in records.values()]
    return {
        "tokens": tokens,
        "documents": sum(index["splits"][split]["documents"] for split in SPLITS),
        "partitions": len(records),
        "partitions_reused": sum(1 for r in records.values() if r.get("reused")),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "num_workers": data.num_workers,
        "nodes": len({w["node"] for w in workers}),
        "driver_cpu_s": round(time.process_time() - cpu_started, 3),
        "driver_peak_rss_mb": worker_figures(started, cpu_started, "driver")["peak_rss_mb"],
        "worker_peak_rss_mb": max(w["peak_rss_mb"] for w in workers),
    }


def _run_jobs(config: Config, jobs: list[ShardJob]) -> dict[str, dict]:
    """Every job's record by partition name, with a progress bar over partitions. With max_documents, a
    source's partitions run one after another, each with the documents the ones before left over."""
    from tqdm import tqdm

    capped = config.data.max_documents is not None
    same_source = [i > 0 and jobs[i - 1].partition.source == job.partition.source for i, job in enumerate(jobs)]
    following = {jobs[i - 1].partition.name: job for i, job in enumerate(jobs) if same_source[i]}
    first = [job for i, job in enumerate(jobs) if not (capped and same_source[i])]

    def follow_up(job: ShardJob, record: dict) -> ShardJob | None:
        nxt, read = following.get(job.partition.name), record["read"]
        if not capped or nxt is None or not read["exhausted"]:
            return None
        return dataclasses.replace(nxt, limit=job.limit - read["documents"])

    records = {}
    with tqdm(total=len(jobs), unit="partition", desc="shard", disable=None) as bar:
        for job, record, reused in run_tasks(config, shard_partition, first, reuse=_completed, follow_up=follow_up):
            records[job.partition.name] = {**record, "reused": reused}
            bar.update(1)
        bar.total = len(records)
        bar.refresh()
    if any(r["reused"] for r in records.values()):
        print(
            f"shard: resumed a build: {sum(r['reused'] for r in records.values())} of {len(records)} "
            "partitions were already complete",
            flush=True,
        )
    return records


def _completed(job: ShardJob) -> dict | None:
    """A partition's record from an earlier, interrupted build, if it matches the job and its files are whole."""
    return load_record(Path(job.build_dir), job.partition.name, job.identity(), np.dtype(job.dtype).itemsize)


def _remove_unlisted_files(directory: Path, records: dict[str, dict]) -> None:
    """Leftovers of killed tasks (temp files, shards of partitions that were redone) are not outputs."""
    listed = {s["file"] for r in records.values() for split in SPLITS for s in r["shards"][split]["shards"]}
    for path in directory.iterdir():
        if path.is_file() and path.suffix in (".bin", ".tmp") and path.name not in listed:
            path.unlink()


def shard_fingerprint(config: Config, tokenizer_fp: str, corpus_fp: str) -> str:
    # num_workers and verify_checksums do not change the bytes written, so they stay out.
    data = config.data.model_dump(mode="json", exclude={"num_workers", "verify_checksums"})
    return fingerprint("shard", CODE_VERSION, data, config.model.family, tokenizer_fp, corpus_fp)


def shard_stage(config: Config, tokenizer: StageResult | None = None) -> StageResult:
    """The shards of the corpus, from the content-addressed cache or built; `tokenizer` is the tokenizer
    stage's result (built or reused here when not given). A cached entry is checked before reuse
    (file sizes, and sha256 with data.verify_checksums) and rebuilt when it fails. An interrupted
    build resumes from its completed partitions."""
    tokenizer = tokenizer or tokenizer_stage(config)
    # The corpus identity, computed once per run by the tokenizer stage when it read the corpus.
    corpus_fp = tokenizer.manifest["inputs"].get("corpus") or fingerprint(corpus_identity(config.data))
    return build_stage(
        config.run.workdir,
        "shard",
        shard_fingerprint(config, tokenizer.fingerprint, corpus_fp),
        code_version=CODE_VERSION,
        inputs={"tokenizer": tokenizer.fingerprint, "corpus": corpus_fp},
        build_fn=lambda directory: write_shards(config, tokenizer.path, tokenizer.fingerprint, directory),
        verify=lambda directory: verify_shards(directory, config.data.verify_checksums),
        resumable=True,
    )
