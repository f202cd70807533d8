"""Tokenizer stage: a byte-level BPE (GPT-2 pre-tokenizer) trained with HF `tokenizers`.

The training sample is drawn from the training split only (so validation bits-per-byte is honest).
Each source contributes up to tokenizer.sample_bytes x its share of the weights, spread over its
partitions in proportion to their size: every partition gives its first training documents that fit
in its share (passing over those that do not, up to twice its share read). The partitions are read
in parallel, one task each, and fed to the trainer in plan order as they arrive (the trainer counts
while the reads go on), so the sample is the same for any number of workers. With data.max_documents
a source's partitions are read one after another, within the source's first max_documents documents.

The output directory holds `tokenizer.json` plus `tokenizer_config.json` and
`special_tokens_map.json`, which `transformers.AutoTokenizer.from_pretrained(dir)` loads.

Round trip: byte-level BPE maps every UTF-8 string to byte tokens, so decode(encode(t)) == t for
any text (with tokenizer.nfc, for any NFC-normalized text).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from pipeline.config import Config, SourceConfig
from pipeline.data.partitions import SPLIT_BY_HASH, Partition, plan_corpus
from pipeline.data.readers import PartitionReader
from pipeline.data.sources import corpus_identity, is_validation
from pipeline.errors import DataError
from pipeline.run.artifacts import StageResult, atomic_write_json, build_stage, fingerprint
from pipeline.run.runtime import run_tasks

# 2: the sample is drawn per partition; 3: huge documents sampled by bytes, the split by MinHash key
CODE_VERSION = "tokenizer-3"
# The BPE trainer holds each sequence whole: the sample reaches it in pieces of at most this many bytes.
SAMPLE_PIECE_BYTES = 1 << 20
TOKENIZER_FILE = "tokenizer.json"
FAMILY_SPECIAL_TOKENS = {
    "gpt": ["<|endoftext|>"],
    "bert": ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"],
}
SEPARATOR = {"gpt": "<|endoftext|>", "bert": "[SEP]"}
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


@dataclass(frozen=True)
class SpecialTokenIds:
    """The ids the loader and the model need; None where the family has no such token."""

    separator: int
    all: tuple[int, ...]
    pad: int | None
    mask: int | None
    cls: int | None


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


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The raw `tokenizers.Tokenizer` of a tokenizer (or shard) directory; use AutoTokenizer for transformers."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"{directory}: no {TOKENIZER_FILE}; build it with `pretrain tokenizer CONFIG`")
    return Tokenizer.from_file(str(path))


def special_token_ids(tokenizer: Tokenizer | str | Path, family: str) -> SpecialTokenIds:
    """Ids of the family's special tokens; an error if the tokenizer was trained for another family."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    ids = {token: tokenizer.token_to_id(token) for token in FAMILY_SPECIAL_TOKENS[family]}
    missing = [token for token, token_id in ids.items() if token_id is None]
    if missing:
        raise DataError(
            f"the tokenizer lacks the {family} special tokens {missing}: it was trained for "
            "another model.family; rebuild it with `pretrain tokenizer CONFIG`"
        )
    return SpecialTokenIds(
        separator=ids[SEPARATOR[family]],
        all=tuple(sorted(ids.values())),
        pad=ids.get("[PAD]"),
        mask=ids.get("[MASK]"),
        cls=ids.get("[CLS]"),
    )


def bert_masking_ids(tokenizer: Tokenizer | str | Path) -> dict:
    """The BatchLoader arguments BERT's masking needs: the [MASK] id and the ids never to mask."""
    special = special_token_ids(tokenizer, "bert")
    return {"mask_token_id": special.mask, "special_token_ids": special.all}


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
