"""One validation function: a window set that depends only on the split and eval.max_windows, and a loss
that is the same at any world size and micro-batch (ranks are simulated in one process here; the
training loop's 2-rank figure is compared with the eval stage's in tests/pipeline/training/test_train.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.loader import TokenDataset
from pipeline.eval.validation import scoring_for, validate, window_set
from tests.pipeline.eval.test_export import random_model, tiny_config


def test_the_window_set_is_the_whole_split_or_an_even_seeded_spread(tiny_shard_dir):
    dataset = TokenDataset(tiny_shard_dir, "val")
    whole = window_set(dataset, "gpt", 32, 10**9)
    assert whole.whole_split and list(whole.ids) == list(range(int(whole.source_starts[-1])))
    some = window_set(dataset, "gpt", 32, 50)
    assert len(some.ids) == 50 and not some.whole_split and np.all(np.diff(some.ids) > 0)
    total = int(some.source_starts[-1])
    strata = np.floor(some.ids / (total / 50)).astype(int)
    assert list(strata) == list(range(50))  # one window in each fiftieth of the split
    assert list(window_set(dataset, "gpt", 32, 50).ids) == list(some.ids)  # the same draw every time


def simulated_ranks(model, dataset, windows, scoring, world_size: int, micro_batch_size: int):
    """`validate` on every rank of a world, in one process: the per-rank sums added as all_reduce would."""
    parts = [
        validate(model, dataset, windows, scoring, micro_batch_size=micro_batch_size, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    return sum(p.nats for p in parts), sum(p.tokens for p in parts)


@pytest.mark.parametrize("family, shards", [("gpt2", "tiny_shard_dir"), ("bert", "tiny_bert_shard_dir")])
def test_the_loss_is_the_same_at_any_world_size_and_micro_batch(family, shards, request):
    shard_dir = request.getfixturevalue(shards)
    config = tiny_config(family)
    model = random_model(config)
    dataset = TokenDataset(shard_dir, "val")
    windows, scoring = window_set(dataset, config.model.family, 32, 37), scoring_for(config, dataset)
    reference = validate(model, dataset, windows, scoring, micro_batch_size=37)
    for world_size, micro in [(1, 4), (2, 8), (2, 3), (3, 5)]:
        nats, tokens = simulated_ranks(model, dataset, windows, scoring, world_size, micro)
        assert tokens.sum() == reference.tokens.sum()  # BERT: the same masks, seeded by window
        assert nats.sum() / tokens.sum() == pytest.approx(reference.loss(), rel=1e-6), (world_size, micro)


def test_ranks_run_the_same_number_of_forward_passes(tiny_shard_dir):
    """ZeRO-3 gathers parameters in every forward pass: a rank with fewer windows still runs them all."""
    config = tiny_config("gpt2")
    dataset = TokenDataset(tiny_shard_dir, "val")
    windows, scoring = window_set(dataset, "gpt", 32, 7), scoring_for(config, dataset)
    model = random_model(config)
    calls = []

    def counted(**batch):
        calls.append(batch["input_ids"].shape[0])
        return model(**batch)

    for rank in range(2):
        calls.clear()
        validate(counted, dataset, windows, scoring, micro_batch_size=2, rank=rank, world_size=2)
        assert len(calls) == 2  # rank 0 scores 4 windows, rank 1 three, both in 2 passes
    assert torch.is_grad_enabled()
