"""Tokenizer stage: a byte-level BPE (GPT-2 pre-tokenizer) trained with HF `tokenizers`, or the user's
existing HF tokenizer (tokenizer.path), copied into the cache under the sha256 of its files so that the
shards and runs built on it stay content-addressed.

The training sample is drawn from the training split only (so validation bits-per-byte is honest).
Each source contributes up to tokenizer.sample_bytes x its share of the weights, spread over its
partitions in proportion to their size: every partition gives its first training documents that fit
in its share (passing over those that do not, up to twice its share read). The partitions are read
in parallel, one task each, and fed to the trainer in plan order as they arrive (the trainer counts
while the reads go on), so the sample is the same for any number of workers. With data.max_documents
a source's partitions are read one after another, within the source's first max_documents documents.

The output directory holds `tokenizer.json` plus `tokenizer_config.json` and
`special_tokens_map.json`, which `transformers.AutoTokenizer.from_pretrained(dir)` loads, and the
special tokens' roles (pipeline/data/special_tokens.py).

Round trip: the trained byte-level BPE maps every UTF-8 string to byte tokens, so decode(encode(t)) == t
for any text (with tokenizer.nfc, for any NFC-normalized text). An existing tokenizer may not (BERT's
WordPiece lowercases and drops spaces), so nothing downstream relies on it: bits per byte count the
source bytes the shard writer recorded.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from pipeline.config import Config, SourceConfig
from pipeline.data.partitions import SPLIT_BY_HASH, Partition, plan_corpus
from pipeline.data.readers import PartitionReader
from pipeline.data.sources import corpus_identity, is_validation
from pipeline.data.special_tokens import declared_roles, resolve_roles, write_roles
from pipeline.errors import DataError
from pipeline.run.artifacts import StageResult, atomic_write_json, build_stage, file_sha256, fingerprint
from pipeline.run.runtime import run_tasks

# 2: the sample is drawn per partition; 3: huge documents sampled by bytes, the split by MinHash key;
# 4: the special tokens' roles are written to special_tokens.ROLES_FILE
CODE_VERSION = "tokenizer-4"
# The files of an existing tokenizer copied into the cache (never weights or the model's config).
PROVIDED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
# The BPE trainer holds each sequence whole: the sample reaches it in pieces of at most this many bytes.
SAMPLE_PIECE_BYTES = 1 << 20
TOKENIZER_FILE = "tokenizer.json"
FAMILY_SPECIAL_TOKENS = {
    "gpt": ["<|endoftext|>"],
    "bert": ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"],
}
# What transformers calls each special token, per family (GPT-2's convention: one token for all).
TRANSFORMERS_ROLES = {
    "gpt": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "bert": {
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "unk_token": "[UNK]",
    },
}


def new_tokenizer(nfc: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], *, family: str, vocab_size: int, min_frequency: int, nfc: bool = False
) -> Tokenizer:
    """Train a byte-level BPE on texts; the family's special tokens take ids 0..k-1."""
    tokenizer = new_tokenizer(nfc)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=FAMILY_SPECIAL_TOKENS[family],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, family: str, directory: str | Path) -> None:
    """tokenizer.json plus the two small files transformers reads to know the special tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    roles = TRANSFORMERS_ROLES[family]
    # PreTrainedTokenizerFast (not a version-specific backend name) loads in transformers 4.x and 5.x;
    # no clean-up of spaces, or transformers' decode would break the round trip.
    atomic_write_json(
        directory / "tokenizer_config.json",
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **roles},
    )
    atomic_write_json(directory / "special_tokens_map.json", roles)


def vocab_rows(tokenizer: Tokenizer) -> int:
    """Embedding rows the tokenizer's ids need: its largest id + 1 (ids need not be contiguous)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The raw `tokenizers.Tokenizer` of a tokenizer (or shard) directory; use AutoTokenizer for transformers."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"{directory}: no {TOKENIZER_FILE}; build it with `pretrain tokenizer CONFIG`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust parser raises a bare Exception
        raise DataError(
            f"{path}: tokenizers {tokenizers.__version__} cannot read it ({exc}); save it again with this "
            "version (`AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`)"
        ) from None


@dataclass(frozen=True)
class SampleJob:
    """One partition's part of the tokenizer sample: its first training documents up to `budget` bytes."""

    partition: Partition
    source: SourceConfig
    val_permille: int
    budget: int
    limit: int | None  # data.max_documents left for this source, or None


def sample_partition(job: SampleJob) -> dict:
    """The partition's first training documents that fit in `budget` bytes together, in pieces of at
    most SAMPLE_PIECE_BYTES: a document that does not fit is passed over, but one larger than the whole
    budget contributes its first bytes (cut at whitespace), so a corpus of one huge document still
    trains the tokenizer. Reading stops once twice the budget has been read."""
    reader = PartitionReader(job.partition, job.source, job.limit)
    texts, size, scanned = [], 0, 0
    hashed = job.partition.split == SPLIT_BY_HASH
    for text in reader:
        data = text.encode("utf-8")
        scanned += len(data)
        training = job.partition.split == "train" or hashed and not is_validation(text, job.val_permille)
        if training and (size + len(data) <= job.budget or len(data) > job.budget):
            kept = data[: int(job.budget) - size]
            texts += byte_pieces(kept, complete=len(kept) == len(data))
            size += len(kept)
            if len(kept) < len(data):
                break  # the budget is spent on this document's first bytes
        if scanned >= 2 * job.budget or size == job.budget:
            break
    else:
        return {"texts": texts, "bytes": size, "documents": reader.stats.documents, "exhausted": reader.stats.exhausted}
    return {"texts": texts, "bytes": size, "documents": reader.stats.documents, "exhausted": False}


def byte_pieces(data: bytes, *, complete: bool) -> list[str]:
    """UTF-8 text in pieces of at most SAMPLE_PIECE_BYTES, cut after whitespace where there is some in
    a piece's second half. The BPE trainer holds each sequence it is given whole, so a 50 MB document
    fed in one piece costs gigabytes; byte-level pre-tokenization splits at whitespace anyway, so the
    cuts leave the statistics unchanged but for the piece ends. An incomplete document (its first
    bytes only) also loses a trailing partial character."""
    pieces, start = [], 0
    while start < len(data):
        end = min(start + SAMPLE_PIECE_BYTES, len(data))
        if end < len(data) or not complete:
            space = max(data.rfind(b" ", start + SAMPLE_PIECE_BYTES // 2, end), data.rfind(b"\n", start, end))
            end = space + 1 if space > start + SAMPLE_PIECE_BYTES // 2 else end
        pieces.append(data[start:end].decode("utf-8", "ignore"))
        start = end
    return [piece for piece in pieces if piece]


def sample_corpus(config: Config) -> Iterator[str]:
    """The tokenizer's training sample, read by data.num_workers parallel tasks, in plan order."""
    data, sample_bytes = config.data, config.tokenizer.sample_bytes
    plan = plan_corpus(data)
    total_weight = sum(s.weight for s in data.sources)
    jobs = []
    for position, source in enumerate(data.sources):
        mine = [p for p in plan if p.source == position]
        budget = sample_bytes * source.weight / total_weight
        sizes = [p.size for p in mine] if all(p.size for p in mine) else [1] * len(mine)
        shares = [budget] + [0] * (len(mine) - 1) if data.max_documents else [budget * s / sum(sizes) for s in sizes]
        jobs += [SampleJob(p, source, data.val_permille, int(b), data.max_documents) for p, b in zip(mine, shares)]
    following = {jobs[i].partition.name: jobs[i + 1] for i in range(len(jobs) - 1)}
    first = [job for job in jobs if not data.max_documents or job.partition.number == 0]

    def follow_up(job: SampleJob, result: dict) -> SampleJob | None:
        nxt = following.get(job.partition.name)
        same_source = nxt is not None and nxt.partition.source == job.partition.source
        if not data.max_documents or not result["exhausted"] or not same_source:
            return None
        return dataclasses.replace(nxt, budget=job.budget - result["bytes"], limit=job.limit - result["documents"])

    names = [job.partition.name for job in jobs]  # plan order
    parts, released = {}, 0
    total = None if data.max_documents else len(jobs)
    with tqdm(total=total, unit="partition", desc="tokenizer sample", disable=None) as bar:
        for job, result, _ in run_tasks(config, sample_partition, first, follow_up=follow_up):
            parts[job.partition.name] = result["texts"]
            bar.update(1)
            # The trainer counts words while later partitions are still being read; a capped source's
            # chain may still grow, so its texts wait for the end.
            while not data.max_documents and released < len(names) and names[released] in parts:
                yield from parts.pop(names[released])
                released += 1
    for name in names[released:]:
        yield from parts.pop(name, [])


def tokenizer_fingerprint(config: Config, corpus: list[dict]) -> str:
    """Everything the trained tokenizer depends on; `corpus` is sources.corpus_identity(config.data)."""
    data = config.data
    return fingerprint(
        "tokenizer",
        CODE_VERSION,
        config.tokenizer,
        config.model.family,
        corpus,
        data.max_documents,
        data.val_permille,
        data.partition_bytes,
    )


def tokenizer_stage(config: Config) -> StageResult:
    """The tokenizer: config.tokenizer.path's, copied into the cache, or one trained on the corpus (or the
    cached one with the same fingerprint)."""
    return provided_tokenizer_stage(config) if config.tokenizer.path else trained_tokenizer_stage(config)


def provided_tokenizer_files(path: str | Path) -> list[Path]:
    """The tokenizer files of tokenizer.path: a directory's PROVIDED_FILES, or a single tokenizer.json."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [path / name for name in PROVIDED_FILES if (path / name).is_file()]


def provided_tokenizer_stage(config: Config) -> StageResult:
    """Copy an existing HF tokenizer into the cache, keyed by its files' sha256, after checking that it
    loads and has the family's special tokens."""
    settings, family = config.tokenizer, config.model.family
    files = provided_tokenizer_files(settings.path)
    digests = {file.name: file_sha256(file) for file in files}

    def build(directory: Path) -> dict:
        for file in files:
            # A lone file is the tokenizer.json, whatever its name.
            shutil.copy2(file, directory / (file.name if len(files) > 1 else TOKENIZER_FILE))
        tokenizer = load_tokenizer(directory)
        source = f"tokenizer.path={settings.path}"
        write_roles(
            directory, resolve_roles(tokenizer, declared_roles(directory), settings.special_tokens, family, source)
        )
        return {"vocab_size": vocab_rows(tokenizer), "files": len(files)}

    return build_stage(
        config.run.workdir,
        "tokenizer",
        fingerprint("tokenizer", CODE_VERSION, "provided", digests, family, settings.special_tokens),
        code_version=CODE_VERSION,
        inputs={"tokenizer": fingerprint(digests)},
        build_fn=build,
    )


def trained_tokenizer_stage(config: Config) -> StageResult:
    """Train the tokenizer, or reuse the cached one with the same fingerprint."""
    corpus = corpus_identity(config.data)
    tokenizer_fp = tokenizer_fingerprint(config, corpus)

    def build(directory: Path) -> dict:
        started = time.perf_counter()
        settings = config.tokenizer
        sampled = {"documents": 0, "bytes": 0}

        def counted(texts: Iterator[str]) -> Iterator[str]:
            for text in texts:
                sampled["documents"] += 1
                sampled["bytes"] += len(text.encode("utf-8"))
                yield text

        tokenizer = train_tokenizer(
            counted(sample_corpus(config)),
            family=config.model.family,
            vocab_size=settings.vocab_size,
            min_frequency=settings.min_frequency,
            nfc=settings.nfc,
        )
        if sampled["documents"] == 0:
            raise DataError(
                "the tokenizer sample is empty: the corpus has no training-split document; add documents or "
                "lower data.val_permille"
            )
        save_tokenizer(tokenizer, config.model.family, directory)
        roles = resolve_roles(tokenizer, declared_roles(directory), {}, config.model.family, str(directory))
        write_roles(directory, roles)
        seconds = time.perf_counter() - started
        return {
            "vocab_size": tokenizer.get_vocab_size(),
            "sample_documents": sampled["documents"],
            "sample_bytes": sampled["bytes"],
            "seconds": round(seconds, 3),
            "mb_per_s": round(sampled["bytes"] / 1e6 / seconds, 3),
        }

    return build_stage(
        config.run.workdir,
        "tokenizer",
        tokenizer_fp,
        code_version=CODE_VERSION,
        inputs={"corpus": fingerprint(corpus)},
        build_fn=build,
    )
