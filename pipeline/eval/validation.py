"""One validation function, for the training loop's in-loop validation and for the eval stage.

Which windows. The validation split's windows (seq_len+1 tokens for GPT, seq_len for BERT, at stride
seq_len, numbered source after source) are all scored when there are at most `eval.max_windows` of
them; otherwise `eval.max_windows` of them, one drawn from each of that many equal strata of the
numbering with a fixed seed, so the set covers every source and every part of the split evenly. The set
depends on the split and `eval.max_windows` alone: not on the world size, the micro-batch, the run's
seed or the step, so every checkpoint of every run on the same shards is scored on the same tokens.

How. The set is one global list; rank r scores its items r, r + world, ... in micro-batches of at most
`micro_batch_size` windows (every rank runs the same number of forward passes, a requirement of ZeRO-3,
padding with weightless windows). Each window's BERT mask is drawn from a generator seeded by the
window's id alone. Losses are summed per token (BERT: per masked token) and per source, all-reduced,
then divided by the token counts: the loss is the same at any world size and micro-batch, up to the
order of floating-point sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.data.loader import TokenDataset, windows_per_source
from pipeline.data.masking import IGNORE_INDEX, document_ids, mlm_mask
from pipeline.data.shards import SHARD_TOKENIZER_DIR
from pipeline.data.special_tokens import bert_masking_ids

# The seed of the window draw and of BERT's validation masks: fixed, so that runs with different
# run.seed compare on the same windows and masks.
VALIDATION_SEED = 20_240_607


@dataclass(frozen=True)
class WindowSet:
    """The windows scored: global ids, the source of each, and where each source's windows start."""

    ids: np.ndarray
    sources: np.ndarray
    source_starts: np.ndarray  # global id of each source's first window, and the total at the end

    @property
    def whole_split(self) -> bool:
        return len(self.ids) == int(self.source_starts[-1])

    def tokens(self, dataset: TokenDataset, item: int, window: int, seq_len: int) -> np.ndarray:
        """The `window` tokens of the item-th window of the set."""
        source = int(self.sources[item])
        start = (int(self.ids[item]) - int(self.source_starts[source])) * seq_len
        return dataset.read(source, start, window).astype(np.int64)


@dataclass
class ValidationSums:
    """Per source, summed over every rank: nats, scored tokens, correct predictions (BERT's accuracy)."""

    nats: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray

    def loss(self, source: int | None = None) -> float:
        picked = slice(None) if source is None else source
        nats, tokens = self.nats[picked].sum(), self.tokens[picked].sum()
        return float(nats / tokens) if tokens else math.nan


def window_set(dataset: TokenDataset, family: str, seq_len: int, max_windows: int) -> WindowSet:
    """The validation windows of a split (see the module docstring)."""
    per_source = windows_per_source(dataset, seq_len, seq_len + 1 if family == "gpt" else seq_len)
    total = int(per_source.sum())
    if total <= max_windows:
        ids = np.arange(total, dtype=np.int64)
    else:
        edges = np.linspace(0, total, max_windows + 1)
        offsets = np.random.default_rng(VALIDATION_SEED).random(max_windows)
        ids = np.floor(edges[:-1] + offsets * (edges[1:] - edges[:-1])).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(per_source)])
    sources = np.searchsorted(starts, ids, side="right") - 1
    return WindowSet(ids, sources, starts)


@dataclass(frozen=True)
class Scoring:
    """How windows become batches: the family, the window length and what masking needs."""

    family: str
    seq_len: int
    separator_id: int | None = None  # set when document masking is on
    mask_token_id: int | None = None
    special_ids: tuple[int, ...] = ()
    vocab_size: int = 0

    @property
    def window(self) -> int:
        return self.seq_len + 1 if self.family == "gpt" else self.seq_len

    def batch(self, rows: list[np.ndarray], window_ids: list[int]) -> dict[str, torch.Tensor]:
        windows = np.stack(rows)
        if self.family == "gpt":
            inputs, labels = windows[:, :-1], windows[:, 1:]
        else:
            inputs, labels = np.empty_like(windows), np.empty_like(windows)
            for row, window_id in enumerate(window_ids):
                rng = np.random.default_rng([VALIDATION_SEED, window_id])
                inputs[row], labels[row] = mlm_mask(
                    windows[row],
                    rng,
                    probability=0.15,
                    mask_token_id=self.mask_token_id,
                    special_ids=np.asarray(self.special_ids, dtype=np.int64),
                    vocab_size=self.vocab_size,
                )
        batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs))}
        if self.separator_id is not None:
            batch["document_ids"] = torch.from_numpy(document_ids(inputs, self.separator_id, self.family))
        return batch | {"labels": torch.from_numpy(np.ascontiguousarray(labels))}


@torch.no_grad()
def validate(
    model: Callable[..., object],
    dataset: TokenDataset,
    windows: WindowSet,
    scoring: Scoring,
    *,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> ValidationSums:
    """Score this rank's share of `windows` with `model` (anything whose call returns `.logits`);
    `all_reduce` sums the per-source figures over ranks (None on one process)."""
    device = device or torch.device("cpu")
    n_sources = len(dataset.streams)
    sums = torch.zeros(3, n_sources, dtype=torch.float64, device=device)
    mine = list(range(rank, len(windows.ids), world_size))
    passes = math.ceil(math.ceil(len(windows.ids) / world_size) / micro_batch_size)
    for number in range(passes):
        items = mine[number * micro_batch_size : (number + 1) * micro_batch_size]
        weight = 1.0 if items else 0.0  # a rank with nothing left still runs the forward pass (ZeRO-3)
        items = items or [0]
        rows = [windows.tokens(dataset, item, scoring.window, scoring.seq_len) for item in items]
        batch = {k: v.to(device) for k, v in scoring.batch(rows, [int(windows.ids[i]) for i in items]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        nats = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        keep = labels != IGNORE_INDEX
        right = (logits.argmax(-1) == labels) & keep
        source = torch.as_tensor(windows.sources[items], device=device)
        sums[0].index_add_(0, source, weight * nats.view_as(labels).sum(1).double())
        sums[1].index_add_(0, source, weight * keep.sum(1).double())
        sums[2].index_add_(0, source, weight * right.sum(1).double())
    if all_reduce is not None:
        all_reduce(sums)
    nats, tokens, correct = sums.cpu().numpy()
    return ValidationSums(nats, tokens, correct)


def scoring_for(config: Config, dataset: TokenDataset) -> Scoring:
    """The Scoring a run's config asks for, with BERT's special ids from the shards' tokenizer copy."""
    family, t = config.model.family, config.train
    masking = {}
    if family == "bert":
        ids = bert_masking_ids(dataset.shard_dir / SHARD_TOKENIZER_DIR)
        masking = {
            "mask_token_id": ids["mask_token_id"],
            "special_ids": tuple(ids["special_token_ids"]),
            "vocab_size": dataset.vocab_size,
        }
    separator = dataset.index["separator_id"] if t.document_masking else None
    return Scoring(family, t.seq_len, separator_id=separator, **masking)


def named_losses(sums: ValidationSums, names: list[str], prefix: str = "val") -> dict[str, float]:
    """{"val/loss": ..., "val/<source>/loss": ...} (per source only when there are several)."""
    losses = {f"{prefix}/loss": sums.loss()}
    if len(names) > 1:
        losses |= {f"{prefix}/{name}/loss": sums.loss(i) for i, name in enumerate(names) if sums.tokens[i]}
    return losses
