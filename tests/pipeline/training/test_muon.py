"""train.optimizer=muon through DeepSpeed's MuonWithAuxAdam on 2 CPU ranks: it trains at ZeRO 0, 1 and 3
with the same losses, a resume is exact (the momentum buffers are in the checkpoint), and the resumed
run gets the current Muon settings."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.pipeline.training.test_init_from import train, write_config
from tests.pipeline.training.test_resume import applied_tags
from tests.pipeline.training.test_train import TINY, losses

# A constant rate after warmup: a leg of 5 steps has the schedule of the first 5 of 10.
MUON = [*TINY, "train.optimizer=muon", "train.grad_clip=0", "train.eval_every=0", "train.schedule=constant"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def muon_runs(tiny_shard_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("muon")
    zero1 = [*MUON, "train.zero_stage=1"]
    runs = {  # zero3 last: zero.Init swaps F.linear for the rest of the process
        "zero0": [*MUON, "train.zero_stage=0"],
        "zero1": zero1,
        "halves": [*zero1, "train.max_steps=5"],
        "changed": [*zero1, "train.max_steps=5"],
        "zero3": [*MUON, "train.zero_stage=3"],
    }
    pairs = {name: (root / name, tiny_shard_dir) for name in runs}
    for name, overrides in runs.items():
        write_config(root / name, overrides)
    train(pairs, root / "tmp")
    write_config(root / "halves", zero1)  # resumed to 10 steps, nothing else changed
    write_config(root / "changed", [*zero1, "train.muon_momentum=0.8", "train.muon_lr=0.01"])
    train({name: pairs[name] for name in ("halves", "changed")}, root / "tmp")
    return {name: root / name for name in runs}


def test_muon_trains_with_the_same_losses_at_zero_0_1_and_3(muon_runs):
    reference = losses(muon_runs["zero0"])
    assert sorted(reference) == list(range(1, 11)) and reference[10] < reference[1] - 0.2
    for stage in ("zero1", "zero3"):
        got = losses(muon_runs[stage])
        assert got.keys() == reference.keys()
        for step in reference:
            assert got[step] == pytest.approx(reference[step], rel=2e-3), (stage, step)
    ds_config = json.loads((muon_runs["zero3"] / "deepspeed_config.json").read_text())
    assert ds_config["optimizer"]["type"] == "Muon" and ds_config["zero_optimization"]["reduce_scatter"] is False


def test_a_resumed_muon_run_continues_exactly(muon_runs):
    assert losses(muon_runs["halves"]) == losses(muon_runs["zero1"])  # bit for bit: momentum buffers restored


def test_a_resumed_muon_run_takes_the_new_muon_settings(muon_runs):
    changed, straight = losses(muon_runs["changed"]), losses(muon_runs["zero1"])
    assert [changed[step] for step in range(1, 7)] == [straight[step] for step in range(1, 7)]
    assert changed[7] != straight[7]  # step 6's update used the new settings
    applied = applied_tags(muon_runs["changed"])
    assert (applied["train.applied.muon_momentum"], applied["train.applied.muon_lr"]) == (0.8, pytest.approx(0.01))


def test_muon_refuses_gradient_clipping_and_offload():
    with pytest.raises(ConfigError, match="set train.grad_clip=0"):
        load_config(None, ["train.optimizer=muon"])
    with pytest.raises(ConfigError, match="set train.offload_optimizer=false"):
        load_config(None, ["train.optimizer=muon", "train.grad_clip=0", "train.offload_optimizer=true"])
