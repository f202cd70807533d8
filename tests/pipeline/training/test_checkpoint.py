"""Checkpoint layout, the `latest` pointer, retention, RNG states and resume checks, in one process
(a stand-in writes the engine's files; real DeepSpeed checkpoints are tested in test_train.py)."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.training import checkpoint, rng


def fake_engine_save(root, tag):
    (root / tag).mkdir(parents=True, exist_ok=True)
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def save(run_dir, step, *, keep=2, rank=0, barrier=lambda: None):
    return checkpoint.save(
        run_dir, step, rank=rank, save_engine=fake_engine_save, barrier=barrier, trainer_state={"step": step}, keep=keep
    )


def test_layout_and_latest_pointer(tmp_path):
    path = save(tmp_path, 20)
    assert path == tmp_path / "checkpoints" / "step-00000020"
    names = {p.name for p in path.iterdir()}
    assert names == {"mp_rank_00_model_states.pt", "rng", "trainer_state.json", "checksums.json", "COMPLETE"}
    files = json.loads((path / "checksums.json").read_text())["files"]
    assert files["mp_rank_00_model_states.pt"] == {"bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert set(files) == {"mp_rank_00_model_states.pt", "rng/rank-00000.pt", "trainer_state.json"}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000020\n"
    assert checkpoint.latest_tag(tmp_path) == "step-00000020"
    assert checkpoint.read_trainer_state(path) == {"step": 20}
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))  # atomic writes leave no temp files


def test_no_checkpoint_means_a_fresh_run(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    assert checkpoint.resume_point(tmp_path, load_config(None)) is None


def test_only_rank_0_marks_complete_and_only_after_the_barrier(tmp_path):
    events = []
    save(tmp_path, 5, rank=1, barrier=lambda: events.append("barrier"))
    assert events == ["barrier", "barrier"]  # before writing (rank 0 clears stale debris), and after
    assert not (tmp_path / "checkpoints" / "step-00000005" / "COMPLETE").exists()
    assert not (tmp_path / "checkpoints" / "latest").exists()

    def barrier():
        events.append("rank 0 barrier")
        assert not (tmp_path / "checkpoints" / "latest").exists()

    save(tmp_path, 5, rank=0, barrier=barrier)
    assert checkpoint.latest_tag(tmp_path) == "step-00000005"


def test_keeps_the_newest_n_and_removes_partial_debris(tmp_path):
    fake_engine_save(tmp_path / "checkpoints", "step-00000003")  # a crash left this one without COMPLETE
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000030", "step-00000040"]


def test_partial_checkpoints_are_ignored_and_removed_before_resume(tmp_path):
    save(tmp_path, 10)
    fake_engine_save(tmp_path / "checkpoints", "step-00000020")  # killed while saving
    assert checkpoint.latest_tag(tmp_path) == "step-00000010"
    assert checkpoint.remove_partial(tmp_path) == [tmp_path / "checkpoints" / "step-00000020"]
    assert not (tmp_path / "checkpoints" / "step-00000020").exists()


def test_latest_pointing_at_an_incomplete_checkpoint_is_an_error(tmp_path):
    save(tmp_path, 10)
    (tmp_path / "checkpoints" / "step-00000010" / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpoint.latest_tag(tmp_path)


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    rng.save_rng_state(tmp_path, rank=1)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    assert rng.load_rng_state(tmp_path, rank=1)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert not rng.load_rng_state(tmp_path, rank=5)  # a rank the saving run did not have


def test_config_changes_allowed_and_refused(tmp_path):
    saved = load_config(None, ["train.max_steps=100"])
    save_with_config(tmp_path, saved)
    resumed = load_config(None, ["train.max_steps=200", "train.eval_every=7", "cluster.num_workers=4"])
    _, state, changes = checkpoint.resume_point(tmp_path, resumed)
    assert changes["train.max_steps"] == (100, 200) and changes["train.eval_every"] == (100, 7)
    assert changes["cluster.num_workers"] == (2, 4)
    for override, key in [
        ("model.n_layers=8", "model.n_layers"),
        ("tokenizer.min_frequency=3", "tokenizer.min_frequency"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("train.seq_len=128", "train.seq_len"),
    ]:
        with pytest.raises(ConfigError, match=rf"^{key}: .* a resumed run cannot change it"):
            checkpoint.resume_point(tmp_path, load_config(None, ["train.max_steps=100", override]))


def save_with_config(run_dir, config):
    checkpoint.save(
        run_dir,
        10,
        rank=0,
        save_engine=fake_engine_save,
        barrier=lambda: None,
        keep=2,
        trainer_state={"step": 10, "world_size": 2, "config": config.model_dump(mode="json")},
    )


def test_fingerprint_covers_only_frozen_keys():
    base = checkpoint.fingerprint(load_config(None))
    assert checkpoint.fingerprint(load_config(None, ["train.max_steps=700"])) == base
    assert checkpoint.fingerprint(load_config(None, ["model.d_model=64"])) != base


# ---------------------------------------------------------------------------------------------
# Self-verifying checkpoints: what a user's damage looks like, and what the next resume does


def damage_flip(path):
    data = bytearray((path / "mp_rank_00_model_states.pt").read_bytes())
    data[2] ^= 0xFF
    (path / "mp_rank_00_model_states.pt").write_bytes(bytes(data))


def damage_truncate(path):
    (path / "mp_rank_00_model_states.pt").write_bytes(b"wei")


def damage_complete(path):
    (path / "COMPLETE").unlink()


@pytest.mark.parametrize(
    "damage, reason",
    [
        (damage_flip, "mp_rank_00_model_states.pt fails its sha256 check"),
        (damage_truncate, "mp_rank_00_model_states.pt has 3 bytes, not 7"),
        (damage_complete, "COMPLETE is missing"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, damage, reason):
    for step in (10, 20):
        save(tmp_path, step)
    damage(tmp_path / "checkpoints" / "step-00000020")
    said = []
    assert checkpoint.select_intact(tmp_path, check_hashes=True, echo=said.append) == "step-00000010"
    assert said == [
        f"checkpoint {tmp_path / 'checkpoints' / 'step-00000020'} is damaged ({reason}): moved aside to "
        "step-00000020.damaged; trying the one before"
    ]
    assert checkpoint.latest_tag(tmp_path) == "step-00000010"
    assert (tmp_path / "checkpoints" / "step-00000020.damaged").is_dir()  # kept for a look, out of the way
    assert checkpoint.select_intact(tmp_path, check_hashes=True, echo=said.append) == "step-00000010"
    assert len(said) == 1
    save(tmp_path, 20)  # training goes on and writes step 20 again; retention ignores the damaged copy
    assert checkpoint.latest_tag(tmp_path) == "step-00000020"


def test_sizes_are_checked_even_without_hashes_and_flips_only_with_them(tmp_path):
    save(tmp_path, 10)
    damage_flip(tmp_path / "checkpoints" / "step-00000010")
    assert checkpoint.damage(tmp_path / "checkpoints" / "step-00000010", check_hashes=False) is None
    damage_truncate(tmp_path / "checkpoints" / "step-00000010")
    assert "has 3 bytes" in checkpoint.damage(tmp_path / "checkpoints" / "step-00000010", check_hashes=False)


def test_no_intact_checkpoint_is_one_error_that_advises_nothing_that_loses_progress(tmp_path):
    save(tmp_path, 10)
    damage_flip(tmp_path / "checkpoints" / "step-00000010")
    with pytest.raises(CheckpointError) as error:
        checkpoint.select_intact(tmp_path, check_hashes=True, echo=lambda line: None)
    message = str(error.value)
    assert "step-00000010 (mp_rank_00_model_states.pt fails its sha256 check)" in message and "\n" not in message
    assert "delete" not in message
    assert checkpoint.select_intact(tmp_path, check_hashes=True) is None  # the rerun starts from step 0


def test_a_suspected_checkpoint_falls_back_to_the_one_before(tmp_path):
    for step in (10, 20):
        save(tmp_path, step)
    assert checkpoint.fall_back_from(tmp_path, "step-00000010", "suspect", check_hashes=True) is None
    assert checkpoint.latest_tag(tmp_path) == "step-00000020"  # nothing older: nothing changed
    assert checkpoint.fall_back_from(tmp_path, "step-00000020", "suspect", check_hashes=True) == "step-00000010"
    assert checkpoint.latest_tag(tmp_path) == "step-00000010"
    assert (tmp_path / "checkpoints" / "step-00000020.damaged").is_dir()
