"""The shard loader: memory-mapped token shards -> reproducible, resumable micro-batches.

A shard directory (written by pipeline/data/shard.py) holds flat token files and `index.json`. Each
source's shards of a split concatenate into one token stream. A *sample* is a window of that stream:
GPT windows hold seq_len+1 tokens at stride seq_len (inputs w[:-1], labels w[1:]); BERT windows hold
seq_len tokens at stride seq_len and are masked for MLM (documents inside a window are separated by
[SEP]; no [CLS] is inserted). Windows cross document and shard boundaries but never sources.

Mixing weights are realized here, per epoch: the training split's sample table gives each source
round(S * weight / sum(weights)) samples, where S is the number of windows in the whole split;
a source below its share repeats all its windows and then draws the remainder without replacement,
a source above its share is subsampled, both seeded by (seed, epoch, source), so over epochs every
window is used. Validation splits (and single-source corpora) use every window exactly once.

An epoch is a permutation, seeded by (seed, epoch), of that table. Every next_batch() consumes the
next micro_batch_size x world_size samples of the epoch on every rank, rank r taking positions
[r*B, (r+1)*B) of the chunk; fewer than B x world_size left ends the epoch. The loader state is
therefore (epoch, samples_consumed), restored in O(1), and micro-batch 4 x accumulation 2 sees
exactly the samples of micro-batch 8. The BERT mask of the sample at epoch position p is drawn
from a generator seeded by (seed, epoch, p): reproducible after resume, whatever the world size.
Shards are only ever memory-mapped; the loader's own memory is the epoch's sample table, 8 bytes
per sample (3% of the shard bytes at seq_len 128 with uint16 tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.masking import document_ids, mlm_mask
from pipeline.data.shards import check_shard_files, read_index
from pipeline.errors import DataError

if TYPE_CHECKING:
    import torch

# Domain tags keep the generators for permutation, subsampling and masking independent.
_PERMUTE, _SUBSAMPLE, _MASK = 0, 1, 2


class _SourceStream:
    """One source's shards of one split as a single token sequence, memory-mapped lazily."""

    def __init__(self, paths: list[Path], tokens: list[int], dtype: np.dtype):
        self.paths, self.dtype = paths, dtype
        self.starts = np.concatenate([[0], np.cumsum(tokens, dtype=np.int64)])
        self._maps: list[np.memmap | None] = [None] * len(paths)

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        end, pieces = start + length, []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            low, high = start - self.starts[shard], min(end, self.starts[shard + 1]) - self.starts[shard]
            pieces.append(self._map(shard)[low:high])
            start += high - low
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _map(self, shard: int) -> np.memmap:
        if self._maps[shard] is None:
            self._maps[shard] = np.memmap(self.paths[shard], dtype=self.dtype, mode="r")
        return self._maps[shard]


class TokenDataset:
    """One split of a shard directory: per-source token streams memory-mapped, never read into RAM."""

    def __init__(self, shard_dir: str | Path, split: str = "train"):
        self.shard_dir = Path(shard_dir)
        self.index = read_index(self.shard_dir)
        if split not in self.index["splits"]:
            raise DataError(f"{self.shard_dir}: no split `{split}` (splits: {', '.join(self.index['splits'])})")
        self.split = split
        self.vocab_size: int = self.index["vocab_size"]
        check_shard_files(self.shard_dir, self.index, split, verify_checksums=False)  # sizes: cheap
        shards = self.index["splits"][split]["shards"]
        self.total_tokens: int = sum(s["tokens"] for s in shards)
        self.source_bytes: int = sum(s["source_bytes"] for s in shards)
        self.documents: int = sum(s["documents"] for s in shards)
        dtype = np.dtype(self.index["dtype"])
        self.streams = [
            _SourceStream(
                [self.shard_dir / s["file"] for s in shards if s["source"] == source],
                [s["tokens"] for s in shards if s["source"] == source],
                dtype,
            )
            for source in range(len(self.index["sources"]))
        ]
        # Mixing weights shape what the model trains on; validation measures the corpus as it is.
        self.weights: list[float] | None = [s["weight"] for s in self.index["sources"]] if split == "train" else None

    def source_names(self) -> list[str]:
        return [s["name"] for s in self.index["sources"]]

    def read(self, source: int, start: int, length: int) -> np.ndarray:
        return self.streams[source].read(start, length)


def check_vocab_fits(dataset: TokenDataset, model_vocab_size: int) -> None:
    """Before training: every token id of the shards must have an embedding row."""
    if dataset.vocab_size > model_vocab_size:
        raise DataError(
            f"{dataset.shard_dir}: the tokenizer has {dataset.vocab_size} tokens but "
            f"model.vocab_size={model_vocab_size}; set model.vocab_size >= {dataset.vocab_size} "
            "or leave it unset to derive it from tokenizer.vocab_size"
        )


def windows_per_source(dataset: TokenDataset, seq_len: int, window: int) -> np.ndarray:
    """Windows of `window` tokens at stride seq_len that fit in each source's stream."""
    return np.array([max(0, (s.total - window) // seq_len + 1) for s in dataset.streams], dtype=np.int64)


def target_counts(windows: np.ndarray, weights: list[float] | None, names: list[str]) -> np.ndarray:
    """Samples per epoch from each source: all its windows, or its weighted share of the total."""
    if weights is None:
        return windows.copy()
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.floor(windows.sum() * share + 0.5).astype(np.int64)
    for name, count, available in zip(names, counts, windows):
        if count > 0 and available == 0:
            raise DataError(
                f"source {name} has weight > 0 but too few training tokens for one window; "
                "lower train.seq_len, add documents or drop the source"
            )
    return counts


def epoch_sample_table(windows: np.ndarray, counts: np.ndarray, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Global window ids of one epoch (sources' windows numbered one after another), in sample order."""
    offsets = np.concatenate([[0], np.cumsum(windows)])
    parts = []
    for source, (available, wanted) in enumerate(zip(windows, counts)):
        repeats, remainder = divmod(int(wanted), int(available)) if available else (0, 0)
        rng = np.random.default_rng([seed, epoch, _SUBSAMPLE, source])
        extra = np.sort(rng.choice(available, size=remainder, replace=False)) if remainder else np.zeros(0, np.int64)
        parts.append(offsets[source] + np.concatenate([np.tile(np.arange(available), repeats), extra]))
    table = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return np.random.default_rng([seed, epoch, _PERMUTE]).permutation(table) if shuffle else table


class BatchLoader:
    """Micro-batches for one rank; see the module docstring for the sampling contract. With
    `separator_id` each batch also holds `document_ids` (B, T) for document masking."""

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        family: str,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        mask_token_id: int | None = None,
        special_token_ids=(),
        vocab_size: int | None = None,
        mlm_probability: float = 0.15,
        separator_id: int | None = None,
    ):
        _check_loader_args(family, seq_len, micro_batch_size, rank, world_size, mask_token_id)
        self.dataset, self.family, self.seq_len = dataset, family, seq_len
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.mask_token_id, self.mlm_probability = mask_token_id, mlm_probability
        self.separator_id = separator_id
        self.special_ids = np.asarray(sorted(special_token_ids), dtype=np.int64)
        self.vocab_size = vocab_size or dataset.vocab_size
        self.window = seq_len + 1 if family == "gpt" else seq_len
        self._windows = windows_per_source(dataset, seq_len, self.window)
        self._window_offsets = np.concatenate([[0], np.cumsum(self._windows)])
        self._counts = target_counts(self._windows, dataset.weights, dataset.source_names())
        self.samples_per_epoch = int(self._counts.sum())
        chunk = micro_batch_size * world_size
        if self.samples_per_epoch < chunk:
            raise DataError(
                f"split `{dataset.split}` of {dataset.shard_dir} has {self.samples_per_epoch} samples "
                f"of {self.window} tokens, fewer than one micro-batch over all ranks "
                f"({micro_batch_size} x {world_size}); add data or lower seq_len or the batch size"
            )
        self.epoch, self.samples_consumed = 0, 0
        self._table: np.ndarray | None = None
        self._table_epoch = -1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = int(state["epoch"]), int(state["samples_consumed"])
        if epoch < 0 or not 0 <= consumed <= self.samples_per_epoch:
            raise DataError(
                f"loader state {state} does not fit this data ({self.samples_per_epoch} samples "
                "per epoch); resume with the shards the run started with"
            )
        self.epoch, self.samples_consumed = epoch, consumed

    def next_batch(self) -> dict[str, torch.Tensor]:
        chunk = self.micro_batch_size * self.world_size
        if self.samples_consumed + chunk > self.samples_per_epoch:
            self.epoch, self.samples_consumed = self.epoch + 1, 0
        first = self.samples_consumed + self.rank * self.micro_batch_size
        positions = np.arange(first, first + self.micro_batch_size)
        table = self._epoch_table()
        windows = np.stack([self._read_window(int(table[p])) for p in positions]).astype(np.int64)
        self.samples_consumed += chunk
        inputs = windows[:, :-1] if self.family == "gpt" else windows
        batch = (
            {"input_ids": _tensor(inputs), "labels": _tensor(windows[:, 1:])}
            if self.family == "gpt"
            else self._bert_batch(windows, positions)
        )
        if self.separator_id is not None:  # from the unmasked tokens: BERT's masking never hides a [SEP]
            batch["document_ids"] = _tensor(document_ids(inputs, self.separator_id, self.family))
        return batch

    def _epoch_table(self) -> np.ndarray:
        if self._table_epoch != self.epoch:
            self._table = epoch_sample_table(self._windows, self._counts, self.seed, self.epoch, self.shuffle)
            self._table_epoch = self.epoch
        return self._table

    def _read_window(self, window_id: int) -> np.ndarray:
        source = int(np.searchsorted(self._window_offsets, window_id, side="right")) - 1
        start = (window_id - int(self._window_offsets[source])) * self.seq_len
        return self.dataset.read(source, start, self.window)

    def _bert_batch(self, windows: np.ndarray, positions: np.ndarray) -> dict[str, torch.Tensor]:
        inputs, labels = np.empty_like(windows), np.empty_like(windows)
        for row, position in enumerate(positions):
            rng = np.random.default_rng([self.seed, self.epoch, _MASK, int(position)])
            inputs[row], labels[row] = mlm_mask(
                windows[row],
                rng,
                probability=self.mlm_probability,
                mask_token_id=self.mask_token_id,
                special_ids=self.special_ids,
                vocab_size=self.vocab_size,
            )
        # Packed windows have no padding, so no attention_mask: without one (and without document masking)
        # attention takes the flash kernel, with document masking on CUDA the FlexAttention block mask.
        return {"input_ids": _tensor(inputs), "labels": _tensor(labels)}


def _tensor(array: np.ndarray) -> torch.Tensor:
    # torch is imported on first use: shard workers and `pretrain data inspect` never need it.
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def _check_loader_args(
    family: str, seq_len: int, micro_batch_size: int, rank: int, world_size: int, mask_token_id: int | None
) -> None:
    if family not in ("gpt", "bert"):
        raise DataError(f"family={family!r}: use `gpt` or `bert`")
    if seq_len < 1 or micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(
            f"seq_len={seq_len}, micro_batch_size={micro_batch_size}, rank={rank}, "
            f"world_size={world_size}: need positive sizes and 0 <= rank < world_size"
        )
    if family == "bert" and mask_token_id is None:
        raise DataError("family=bert needs mask_token_id (see pipeline.data.tokenizer.special_token_ids)")
