"""Shard stage: documents -> train/val token shards + index.json, tokenized in parallel by Ray Data.

The driver streams documents from the sources in (source, document) order, in windows of about
WINDOW_BYTES of text. Each window is tokenized by `data.num_workers` workers (a Ray Data actor
pool; a single worker tokenizes in the driver process and skips Ray's start-up cost), the results
are sorted back into (source, document) order, and the driver appends them to the shard files.
Sorting before writing is what makes the output byte-identical for any number of workers.

Every document goes to train or val by a stable hash of its text (data.val_permille), gets the
separator token appended, and lands in a shard file of its split and source: per-source shards
let the loader realize the mixing weights (see pipeline/data.py). A shard closes once it holds
data.shard_tokens tokens; documents are never split across shards.

index.json (format 1): format_version, family, vocab_size, dtype (uint16 if the vocabulary fits,
else uint32), tokenizer_fingerprint, separator_id, shard_tokens, val_permille;
splits.{train,val}: shards [{file, source, tokens, documents, source_bytes, sha256}] and totals
(tokens, documents, source_bytes); sources [{name, weight, target_share, natural_share, documents,
train_tokens, val_tokens, text_bytes, invalid_utf8_bytes}]. The shard directory also holds a copy
of the tokenizer in `tokenizer/`, so it is self-contained for evaluation and export.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.artifacts import StageResult, atomic_write_json, build_stage, fingerprint
from pipeline.config import Config, DataConfig
from pipeline.data import (
    INDEX_FILE,
    INDEX_FORMAT_VERSION,
    SHARD_TOKENIZER_DIR,
    SPLITS,
    token_dtype,
    tokenizer_hashes,
    verify_shards,
)
from pipeline.runtime import ray_connection
from pipeline.sources import Document, SourceReader, is_validation, iter_corpus, make_readers
from pipeline.tokenizer import load_tokenizer, special_token_ids, tokenizer_stage

CODE_VERSION = "shard-3"  # 2: index.json holds tokenizer sha256s; 3: fingerprint over the corpus fingerprint
WINDOW_BYTES = 64 << 20  # text tokenized per round trip to the workers: bounds the driver's memory
BATCH_DOCUMENTS = 64  # documents per tokenizer call (and per Ray Data batch)
BLOCKS_PER_WORKER = 8  # more blocks than workers, so a worker that finishes early takes more work
RESULT_SCHEMA = pa.schema(
    [
        ("source", pa.int64()),
        ("index", pa.int64()),
        ("val", pa.bool_()),
        ("source_bytes", pa.int64()),
        ("tokens", pa.binary()),
    ]
)


class TokenizeBatch:
    """Tokenize a batch of documents: split by hash, append the separator, encode as shard bytes.

    A callable class so each Ray Data actor loads the tokenizer once. Each call encodes one
    document at a time, so a worker uses one core and N workers scale over N cores.
    """

    def __init__(self, tokenizer_dir: str, separator_id: int, dtype: str, val_permille: int):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        # Documents are literal text: a "<|endoftext|>" inside one must not become the separator.
        self.tokenizer.encode_special_tokens = True
        self.separator = np.array([separator_id], dtype=dtype)
        self.dtype, self.val_permille = np.dtype(dtype), val_permille

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        tokens = [
            np.concatenate([np.asarray(self.tokenizer.encode(t).ids, dtype=self.dtype), self.separator]).tobytes()
            for t in texts
        ]
        return pa.table(
            {
                "source": batch.column("source"),
                "index": batch.column("index"),
                "val": pa.array([is_validation(t, self.val_permille) for t in texts], pa.bool_()),
                "source_bytes": pa.array([len(t.encode("utf-8")) for t in texts], pa.int64()),
                "tokens": pa.array(tokens, pa.binary()),
            },
            schema=RESULT_SCHEMA,
        )


class _Shard:
    def __init__(self, path: Path, source: int):
        self.path, self.source = path, source
        self.handle = open(path, "wb")  # noqa: SIM115 (open while the shard fills; closed by close())
        self.sha256 = hashlib.sha256()
        self.tokens = self.documents = self.source_bytes = 0

    def append(self, tokens: bytes, itemsize: int, source_bytes: int) -> None:
        self.handle.write(tokens)
        self.sha256.update(tokens)
        self.tokens += len(tokens) // itemsize
        self.documents += 1
        self.source_bytes += source_bytes

    def close(self) -> dict:
        self.handle.close()
        return {
            "file": self.path.name,
            "source": self.source,
            "tokens": self.tokens,
            "documents": self.documents,
            "source_bytes": self.source_bytes,
            "sha256": self.sha256.hexdigest(),
        }


class SplitWriter:
    """Appends one split's documents to per-source shard files of about shard_tokens tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.itemsize, self.shard_tokens = directory, split, dtype.itemsize, shard_tokens
        self.shards: list[dict] = []
        self._open: _Shard | None = None
        self._numbers: dict[int, int] = {}

    def add(self, source: int, tokens: bytes, source_bytes: int) -> None:
        if self._open is not None and self._open.source != source:
            self._close()
        if self._open is None:
            number = self._numbers[source] = self._numbers.get(source, -1) + 1
            self._open = _Shard(self.directory / f"{self.split}-{source:03d}-{number:05d}.bin", source)
        self._open.append(tokens, self.itemsize, source_bytes)
        if self._open.tokens >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        if self._open is not None:
            self.shards.append(self._open.close())
            self._open = None

    def finish(self) -> dict:
        self._close()
        return {
            "shards": self.shards,
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "source_bytes": sum(s["source_bytes"] for s in self.shards),
        }


def document_windows(documents: Iterable[Document], max_bytes: int) -> Iterator[list[Document]]:
    window, size = [], 0
    for document in documents:
        window.append(document)
        size += len(document.text)
        if size >= max_bytes:
            yield window
            window, size = [], 0
    if window:
        yield window


def documents_table(documents: list[Document]) -> pa.Table:
    return pa.table(
        {
            "source": pa.array([d.source for d in documents], pa.int64()),
            "index": pa.array([d.index for d in documents], pa.int64()),
            "text": pa.array([d.text for d in documents], pa.string()),
        }
    )


@contextlib.contextmanager
def tokenize_executor(config: Config, **tokenize_args) -> Iterator[Callable[[list[Document]], Iterator[pa.Table]]]:
    """A function mapping documents to tables of results, on 1 process or N Ray Data workers (on the
    Ray the pipeline runs on, or one started for this stage)."""
    num_workers = config.data.num_workers
    if num_workers == 1:
        tokenize = TokenizeBatch(**tokenize_args)
        yield lambda documents: (
            tokenize(documents_table(documents[start : start + BATCH_DOCUMENTS]))
            for start in range(0, len(documents), BATCH_DOCUMENTS)
        )
        return
    import ray

    with ray_connection(config):
        ray.data.DataContext.get_current().enable_progress_bars = False  # the stage shows its own, over bytes
        # No per-execution plan lines, and not its warning that the progress bars just turned off are off.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        yield lambda documents: _ray_tokenize(documents, num_workers, tokenize_args)


def _ray_tokenize(documents: list[Document], num_workers: int, tokenize_args: dict) -> Iterator[pa.Table]:
    import ray

    # from_items builds its blocks in the driver: no remote metadata tasks, unlike from_arrow.
    dataset = ray.data.from_items(
        [{"source": d.source, "index": d.index, "text": d.text} for d in documents],
        override_num_blocks=min(len(documents), num_workers * BLOCKS_PER_WORKER),
    )
    tokenized = dataset.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs=tokenize_args,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        batch_size=BATCH_DOCUMENTS,
        batch_format="pyarrow",
        num_cpus=1,
        max_restarts=0,  # a lost tokenizer actor fails the stage; the rerun is byte-identical
    )
    return tokenized.iter_batches(batch_size=None, batch_format="pyarrow")


def write_shards(config: Config, tokenizer_dir: Path, tokenizer_fp: str, directory: Path) -> dict:
    """Tokenize the corpus into directory: shard files, index.json and a copy of the tokenizer."""
    started = time.perf_counter()
    data, family = config.data, config.model.family
    tokenizer = load_tokenizer(tokenizer_dir)
    separator_id = special_token_ids(tokenizer, family).separator
    dtype = token_dtype(tokenizer.get_vocab_size())
    writers = {split: SplitWriter(directory, split, dtype, data.shard_tokens) for split in SPLITS}
    readers = make_readers(data)
    tokenize_args = {
        "tokenizer_dir": str(tokenizer_dir),
        "separator_id": separator_id,
        "dtype": dtype.name,
        "val_permille": data.val_permille,
    }
    with (
        tokenize_executor(config, **tokenize_args) as tokenize,
        tqdm(unit="B", unit_scale=True, desc="shard", disable=None) as bar,
    ):
        for window in document_windows(iter_corpus(data, readers), WINDOW_BYTES):
            results = pa.concat_tables(tokenize(window)).sort_by([("source", "ascending"), ("index", "ascending")])
            for row in results.to_pylist():
                writers["val" if row["val"] else "train"].add(row["source"], row["tokens"], row["source_bytes"])
                bar.update(row["source_bytes"])
    splits = {split: writer.finish() for split, writer in writers.items()}
    if splits["val"]["documents"] == 0:
        print(
            f"warning: no document fell into the validation split (data.val_permille={data.val_permille}); "
            "validation needs one: raise data.val_permille or add documents",
            file=sys.stderr,
            flush=True,
        )
    shutil.copytree(tokenizer_dir, directory / SHARD_TOKENIZER_DIR, ignore=shutil.ignore_patterns("manifest.json"))
    write_index(
        directory,
        family=family,
        vocab_size=tokenizer.get_vocab_size(),
        tokenizer_fp=tokenizer_fp,
        separator_id=separator_id,
        data=data,
        splits=splits,
        sources=source_summaries(readers, splits),
    )
    seconds = time.perf_counter() - started
    tokens = sum(s["tokens"] for s in splits.values())
    return {
        "tokens": tokens,
        "documents": sum(s["documents"] for s in splits.values()),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "num_workers": data.num_workers,
    }


def write_index(
    directory: Path,
    *,
    family: str,
    vocab_size: int,
    tokenizer_fp: str,
    separator_id: int,
    data: DataConfig,
    splits: dict,
    sources: list[dict],
) -> None:
    atomic_write_json(
        directory / INDEX_FILE,
        {
            "format_version": INDEX_FORMAT_VERSION,
            "family": family,
            "vocab_size": vocab_size,
            "dtype": token_dtype(vocab_size).name,
            "tokenizer_fingerprint": tokenizer_fp,
            "separator_id": separator_id,
            "tokenizer_sha256": tokenizer_hashes(directory / SHARD_TOKENIZER_DIR),
            "shard_tokens": data.shard_tokens,
            "val_permille": data.val_permille,
            "splits": splits,
            "sources": sources,
        },
    )


def source_summaries(readers: list[SourceReader], splits: dict) -> list[dict]:
    """Per-source totals and weights; the loader mixes by weight, natural_share is the unmixed share."""
    train_tokens = [
        sum(s["tokens"] for s in splits["train"]["shards"] if s["source"] == i) for i in range(len(readers))
    ]
    total_weight = sum(r.source.weight for r in readers)
    return [
        {
            **reader.stats.as_dict(),
            "weight": reader.source.weight,
            "target_share": reader.source.weight / total_weight,
            "natural_share": train_tokens[i] / max(sum(train_tokens), 1),
            "train_tokens": train_tokens[i],
            "val_tokens": sum(s["tokens"] for s in splits["val"]["shards"] if s["source"] == i),
        }
        for i, reader in enumerate(readers)
    ]


def shard_fingerprint(config: Config, tokenizer_fp: str, corpus_fp: str) -> str:
    # num_workers and verify_checksums do not change the bytes written, so they stay out.
    data = config.data.model_dump(mode="json", exclude={"num_workers", "verify_checksums"})
    return fingerprint("shard", CODE_VERSION, data, config.model.family, tokenizer_fp, corpus_fp)


def shard_stage(config: Config, tokenizer: StageResult | None = None) -> StageResult:
    """The shards of the corpus, from the content-addressed cache or built; `tokenizer` is the tokenizer
    stage's result (built or reused here when not given). A cached entry is checked before reuse
    (file sizes, and sha256 with data.verify_checksums) and rebuilt when it fails."""
    tokenizer = tokenizer or tokenizer_stage(config)
    corpus_fp = tokenizer.manifest["inputs"]["corpus"]  # the corpus identity, computed once per run
    return build_stage(
        config.run.workdir,
        "shard",
        shard_fingerprint(config, tokenizer.fingerprint, corpus_fp),
        code_version=CODE_VERSION,
        inputs={"tokenizer": tokenizer.fingerprint, "corpus": corpus_fp},
        build_fn=lambda directory: write_shards(config, tokenizer.path, tokenizer.fingerprint, directory),
        verify=lambda directory: verify_shards(directory, config.data.verify_checksums),
    )
