import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.data.inspect import inspect_shards
from pipeline.data.loader import BatchLoader, TokenDataset, check_vocab_fits, epoch_sample_table, target_counts
from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.shards import verify_shards
from pipeline.data.special_tokens import special_token_ids
from pipeline.errors import DataError


def gpt_loader(shard_dir, split="train", **overrides):
    settings = dict(family="gpt", seq_len=32, micro_batch_size=4, rank=0, world_size=1, seed=7)
    return BatchLoader(TokenDataset(shard_dir, split), **{**settings, **overrides})


def bert_loader(shard_dir, **overrides):
    ids = special_token_ids(shard_dir / "tokenizer", "bert")
    settings = dict(
        family="bert",
        seq_len=64,
        micro_batch_size=8,
        rank=0,
        world_size=1,
        seed=3,
        mask_token_id=ids.mask,
        special_token_ids=ids.all,
    )
    return BatchLoader(TokenDataset(shard_dir), **{**settings, **overrides})


def stream(dataset, source=0):
    """A source's whole token stream, read shard by shard (reference for window checks)."""
    return np.concatenate([np.fromfile(p, dtype=dataset.streams[source].dtype) for p in dataset.streams[source].paths])


def test_dataset_totals_match_index(tiny_shard_dir):
    verify_shards(tiny_shard_dir, verify_checksums=True)
    dataset = TokenDataset(tiny_shard_dir, "train")
    split = dataset.index["splits"]["train"]
    assert dataset.total_tokens == split["tokens"] > 0 and dataset.source_bytes == split["source_bytes"]
    assert dataset.vocab_size == 512
    assert isinstance(dataset.streams[0]._map(0), np.memmap)  # shards are mapped, not read into memory


def test_gpt_batches_are_shifted_windows_of_the_stream(tiny_shard_dir):
    loader = gpt_loader(tiny_shard_dir, shuffle=False, seq_len=100, micro_batch_size=3)
    tokens = stream(loader.dataset)
    assert len(loader.dataset.streams[0].paths) > 1
    for step in range(700):  # far enough to cross several shard boundaries
        batch = loader.next_batch()
        assert batch["input_ids"].shape == (3, 100) and batch["input_ids"].dtype == torch.int64
        first = step * 3 * 100
        assert torch.equal(batch["input_ids"][0], torch.from_numpy(tokens[first : first + 100].astype(np.int64)))
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        assert torch.equal(batch["labels"][2], torch.from_numpy(tokens[first + 201 : first + 301].astype(np.int64)))


def test_ranks_take_disjoint_slices_of_the_global_batch(tiny_shard_dir):
    whole = gpt_loader(tiny_shard_dir, micro_batch_size=12)
    ranks = [gpt_loader(tiny_shard_dir, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        expected = whole.next_batch()["input_ids"]
        assert torch.equal(torch.cat([loader.next_batch()["input_ids"] for loader in ranks]), expected)
    assert all(loader.state_dict() == whole.state_dict() == {"epoch": 0, "samples_consumed": 60} for loader in ranks)


def test_an_epoch_over_all_ranks_covers_every_window_once(tiny_shard_dir):
    ranks = [gpt_loader(tiny_shard_dir, rank=r, world_size=3, seq_len=256, micro_batch_size=16) for r in range(3)]
    steps = ranks[0].samples_per_epoch // 48
    seen = [bytes(row.numpy()) for _ in range(steps) for loader in ranks for row in loader.next_batch()["input_ids"]]
    ordered = gpt_loader(tiny_shard_dir, shuffle=False, seq_len=256, micro_batch_size=1)
    every = [bytes(ordered.next_batch()["input_ids"][0].numpy()) for _ in range(ordered.samples_per_epoch)]
    assert not Counter(seen) - Counter(every)  # no window twice (beyond windows that occur twice)
    assert len(every) - 48 < len(seen) <= len(every)  # all but the last partial global batch
    ranks[0].next_batch()
    assert ranks[0].state_dict() == {"epoch": 1, "samples_consumed": 48}


def test_gradient_accumulation_sees_the_same_samples(tiny_shard_dir):
    small, large = gpt_loader(tiny_shard_dir, micro_batch_size=4), gpt_loader(tiny_shard_dir, micro_batch_size=8)
    for _ in range(3):
        combined = torch.cat([small.next_batch()["input_ids"], small.next_batch()["input_ids"]])
        assert torch.equal(combined, large.next_batch()["input_ids"])


def test_resume_is_o1_and_equals_the_uninterrupted_run(tiny_shard_dir, monkeypatch):
    uninterrupted = gpt_loader(tiny_shard_dir, seq_len=256, micro_batch_size=64)
    steps = uninterrupted.samples_per_epoch // 64
    for _ in range(steps - 2):
        uninterrupted.next_batch()
    state = uninterrupted.state_dict()
    resumed = gpt_loader(tiny_shard_dir, seq_len=256, micro_batch_size=64)
    reads = []
    monkeypatch.setattr(resumed.dataset, "read", lambda *args: reads.append(args))
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert reads == [] and resumed.state_dict() == state  # no replay
    monkeypatch.undo()
    for _ in range(5):  # across the epoch boundary
        assert torch.equal(resumed.next_batch()["input_ids"], uninterrupted.next_batch()["input_ids"])
    assert resumed.state_dict() == uninterrupted.state_dict() and resumed.state_dict()["epoch"] == 1


def test_epochs_reshuffle_and_seeds_differ(tiny_shard_dir):
    loader = gpt_loader(tiny_shard_dir, seq_len=256, micro_batch_size=16)
    first = loader.next_batch()["input_ids"]
    loader.load_state_dict({"epoch": 1, "samples_consumed": 0})
    assert not torch.equal(loader.next_batch()["input_ids"], first)
    other_seed = gpt_loader(tiny_shard_dir, seq_len=256, micro_batch_size=16, seed=8)
    assert not torch.equal(other_seed.next_batch()["input_ids"], first)


def test_validation_walks_in_order_from_zero(tiny_shard_dir):
    loader = gpt_loader(tiny_shard_dir, "val", shuffle=False, micro_batch_size=2)
    assert loader.dataset.weights is None
    tokens = stream(loader.dataset)
    assert torch.equal(loader.next_batch()["input_ids"][1], torch.from_numpy(tokens[32:64].astype(np.int64)))


def test_bert_masking_statistics(tiny_bert_shard_dir):
    loader = bert_loader(tiny_bert_shard_dir, micro_batch_size=64)
    special = np.array(special_token_ids(tiny_bert_shard_dir / "tokenizer", "bert").all)
    counts = dict(candidates=0, chosen=0, masked=0, unchanged=0, special_chosen=0)
    for _ in range(8):  # 512 samples x 64 positions
        start = loader.samples_consumed
        batch = loader.next_batch()
        originals = np.stack([loader._read_window(int(loader._epoch_table()[p])) for p in range(start, start + 64)])
        inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        chosen = labels != IGNORE_INDEX
        assert (labels[chosen] == originals[chosen]).all() and (inputs[~chosen] == originals[~chosen]).all()
        assert "attention_mask" not in batch  # packed windows: no padding, so no mask to build
        is_special = np.isin(originals, special)
        counts["candidates"] += (~is_special).sum()
        counts["special_chosen"] += (chosen & is_special).sum()
        counts["chosen"] += chosen.sum()
        counts["masked"] += (chosen & (inputs == loader.mask_token_id)).sum()
        counts["unchanged"] += (chosen & (inputs == originals)).sum()
    assert counts["special_chosen"] == 0
    assert counts["chosen"] / counts["candidates"] == pytest.approx(0.15, abs=0.01)
    assert counts["masked"] / counts["chosen"] == pytest.approx(0.8, abs=0.02)
    # "unchanged": the 10% kept plus random replacements that drew the original token (1/512 of 10%)
    assert counts["unchanged"] / counts["chosen"] == pytest.approx(0.1, abs=0.015)


def test_bert_masks_reproduce_after_resume_and_across_world_sizes(tiny_bert_shard_dir):
    whole = bert_loader(tiny_bert_shard_dir, micro_batch_size=8)
    whole.load_state_dict({"epoch": 2, "samples_consumed": 80})
    ranks = [bert_loader(tiny_bert_shard_dir, micro_batch_size=4, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict({"epoch": 2, "samples_consumed": 80})
    expected = whole.next_batch()
    parts = [loader.next_batch() for loader in ranks]
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([p[key] for p in parts]), expected[key])


def test_weighted_counts_and_epoch_table():
    windows = np.array([100, 900])
    counts = target_counts(windows, [1.0, 1.0], ["small", "large"])
    assert counts.tolist() == [500, 500]
    table = epoch_sample_table(windows, counts, seed=1, epoch=0, shuffle=True)
    small, large = table[table < 100], table[table >= 100]
    assert np.bincount(small, minlength=100).tolist() == [5] * 100  # upsampled: every window 5 times
    assert len(large) == 500 and len(set(large.tolist())) == 500  # subsampled without replacement
    other_epoch = epoch_sample_table(windows, counts, seed=1, epoch=1, shuffle=True)
    assert set(other_epoch[other_epoch >= 100].tolist()) != set(large.tolist())
    assert epoch_sample_table(windows, windows, seed=1, epoch=0, shuffle=False).tolist() == list(range(1000))
    with pytest.raises(DataError, match="source empty has weight > 0 but too few training tokens"):
        target_counts(np.array([10, 0]), [1.0, 1.0], ["full", "empty"])


def _copy(shard_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    shard = json.loads((copy / "index.json").read_text())["splits"]["train"]["shards"][1]["file"]
    return copy, copy / shard


def test_flipped_byte_fails_the_checksum_naming_the_shard(tiny_shard_dir, tmp_path):
    copy, shard = _copy(tiny_shard_dir, tmp_path)
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    TokenDataset(copy)  # sizes still match: only the checksum can tell
    verify_shards(copy, verify_checksums=False)
    with pytest.raises(DataError, match=f"shard {shard.name} fails its sha256 check"):
        verify_shards(copy, verify_checksums=True)


def test_truncated_and_missing_shards(tiny_shard_dir, tmp_path):
    copy, shard = _copy(tiny_shard_dir, tmp_path)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"shard {shard.name} has .* bytes but index.json says"):
        TokenDataset(copy)
    shard.unlink()
    with pytest.raises(DataError, match=f"shard {shard.name} is missing: .*rebuild it with `pretrain shard"):
        TokenDataset(copy)


def test_not_a_shard_directory(tmp_path):
    with pytest.raises(DataError, match="no index.json, so this is not a shard directory"):
        TokenDataset(tmp_path)
    (tmp_path / "index.json").write_text('{"format_version": 99}')
    with pytest.raises(DataError, match="format_version 99 is not the supported 1"):
        TokenDataset(tmp_path)


def test_bad_loader_arguments(tiny_shard_dir):
    with pytest.raises(DataError, match="fewer than one micro-batch over all ranks"):
        gpt_loader(tiny_shard_dir, "val", seq_len=100_000)
    with pytest.raises(DataError, match="rank=2, world_size=2"):
        gpt_loader(tiny_shard_dir, rank=2, world_size=2)
    with pytest.raises(DataError, match="family=bert needs mask_token_id"):
        gpt_loader(tiny_shard_dir, family="bert")
    with pytest.raises(DataError, match="does not fit this data"):
        gpt_loader(tiny_shard_dir).load_state_dict({"epoch": 0, "samples_consumed": 10**12})


def test_vocab_must_fit_the_model(tiny_shard_dir):
    dataset = TokenDataset(tiny_shard_dir)
    check_vocab_fits(dataset, 512)
    with pytest.raises(DataError, match="the tokenizer has 512 tokens but model.vocab_size=256; set model.vocab_size"):
        check_vocab_fits(dataset, 256)


def test_inspect(tiny_shard_dir):
    text = inspect_shards(tiny_shard_dir)
    assert (
        "train" in text
        and "val share:" in text
        and "bytes/token" in text
        and "source python-stdlib (builtin:python-stdlib):" in text
    )


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_document_ids_come_from_the_separators_without_changing_the_batch(family, tiny_shard_dir, tiny_bert_shard_dir):
    """GPT: the separator opens the next document; BERT: it closes its own."""
    shard_dir = tiny_shard_dir if family == "gpt" else tiny_bert_shard_dir
    separator = TokenDataset(shard_dir).index["separator_id"]
    make = gpt_loader if family == "gpt" else bert_loader
    plain, masked = make(shard_dir, seq_len=128), make(shard_dir, seq_len=128, separator_id=separator)
    documents_per_window = []
    for _ in range(40):
        expected, batch = plain.next_batch(), masked.next_batch()
        assert all(torch.equal(expected[key], batch[key]) for key in expected)
        separators = batch["input_ids"] == separator
        starts = torch.diff(batch["document_ids"], dim=1) == 1  # a new document from the next token on
        if family == "gpt":
            assert torch.equal(starts, separators[:, 1:])
        else:
            assert torch.equal(starts, separators[:, :-1])
        documents_per_window += (batch["document_ids"].max(dim=1).values + 1).tolist()
    assert max(documents_per_window) > 1  # some windows really hold several documents


def test_minhash_signatures_agree_on_near_copies_and_inspect_reports_the_leak_count(tiny_shard_dir):
    import numpy as np

    from pipeline.data.near_duplicates import THRESHOLD, signature

    rng = np.random.default_rng(0)
    document = rng.integers(0, 512, 2000).astype(np.uint64)
    copy = document.copy()
    copy[1000:1010] = rng.integers(0, 512, 10).astype(np.uint64)  # 10 tokens edited: Jaccard ~0.95
    other = rng.integers(0, 512, 2000).astype(np.uint64)
    assert np.mean(signature(document) == signature(copy)) >= THRESHOLD
    assert np.mean(signature(document) == signature(other)) < 0.2
    report = inspect_shards(tiny_shard_dir)
    assert "near-duplicates: " in report and "validation documents have a training document" in report
