"""Tokenizer stage: a byte-level BPE (GPT-2 pre-tokenizer) trained with HF `tokenizers`.

The training sample is drawn from the training split only (so validation bits-per-byte is honest),
each source contributing up to tokenizer.sample_bytes x its share of the weights, in corpus order.
The output directory holds `tokenizer.json` plus `tokenizer_config.json` and
`special_tokens_map.json`, which `transformers.AutoTokenizer.from_pretrained(dir)` loads.

Round trip: byte-level BPE maps every UTF-8 string to byte tokens, so decode(encode(t)) == t for
any text (with tokenizer.nfc, for any NFC-normalized text).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from pipeline.artifacts import StageResult, atomic_write_json, build_stage, fingerprint
from pipeline.config import Config, DataConfig
from pipeline.errors import DataError
from pipeline.sources import corpus_identity, is_validation, make_readers

CODE_VERSION = "tokenizer-1"
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


def sample_corpus(data: DataConfig, sample_bytes: int) -> Iterator[str]:
    """Training-split documents, each source up to its weighted share of sample_bytes, with progress."""
    total_weight = sum(s.weight for s in data.sources)
    with tqdm(total=sample_bytes, unit="B", unit_scale=True, desc="tokenizer sample", disable=None) as bar:
        for reader in make_readers(data):
            budget = int(sample_bytes * reader.source.weight / total_weight)
            for document in reader:
                if is_validation(document.text, data.val_permille):
                    continue
                size = len(document.text.encode("utf-8"))
                if size > budget:
                    break
                budget -= size
                bar.update(size)
                yield document.text


def tokenizer_fingerprint(config: Config, corpus: list[dict]) -> str:
    """Everything the trained tokenizer depends on; `corpus` is sources.corpus_identity(config.data)."""
    data = config.data
    return fingerprint(
        "tokenizer", CODE_VERSION, config.tokenizer, config.model.family, corpus, data.max_documents, data.val_permille
    )


def tokenizer_stage(config: Config) -> StageResult:
    """Train the tokenizer, or reuse the cached one with the same fingerprint."""
    corpus = corpus_identity(config.data)
    tokenizer_fp = tokenizer_fingerprint(config, corpus)

    def build(directory: Path) -> dict:
        started = time.perf_counter()
        sampled = {"documents": 0, "bytes": 0}

        def counted(texts: Iterator[str]) -> Iterator[str]:
            for text in texts:
                sampled["documents"] += 1
                sampled["bytes"] += len(text.encode("utf-8"))
                yield text

        settings = config.tokenizer
        tokenizer = train_tokenizer(
            counted(sample_corpus(config.data, settings.sample_bytes)),
            family=config.model.family,
            vocab_size=settings.vocab_size,
            min_frequency=settings.min_frequency,
            nfc=settings.nfc,
        )
        if sampled["documents"] == 0:
            raise DataError(
                "the tokenizer sample is empty: no training-split document fits "
                f"tokenizer.sample_bytes={settings.sample_bytes}; raise it or add documents"
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
