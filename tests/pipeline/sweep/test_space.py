"""Sweep axes and trials: grids, seeded random draws, trial names, and the refusals."""

from __future__ import annotations

import pytest

from pipeline.errors import SweepError
from pipeline.sweep.space import combination_name, parse_axes, parse_axis, split_values, sweep_trials


def test_a_grid_is_the_product_of_its_axes_first_axis_slowest():
    trials = sweep_trials("gpt", parse_axes(["train.lr=1e-3,3e-4", "model.n_layers=2,4"]))
    assert [t.overrides for t in trials] == [
        ("train.lr=1e-3", "model.n_layers=2"),
        ("train.lr=1e-3", "model.n_layers=4"),
        ("train.lr=3e-4", "model.n_layers=2"),
        ("train.lr=3e-4", "model.n_layers=4"),
    ]
    assert trials[1].name == "gpt-lr=1e-3-n_layers=4"


def test_random_axes_are_drawn_per_trial_in_range_and_the_same_for_the_same_seed():
    axes = parse_axes(["train.lr=loguniform:1e-4:1e-2", "model.n_layers=randint:2:5", "train.warmup_steps=0,10"])
    trials = sweep_trials("gpt", axes, samples=5, seed=3)
    assert len(trials) == 10  # 5 samples x the 2-value grid
    values = [dict(item.split("=") for item in t.overrides) for t in trials]
    assert all(1e-4 <= float(v["train.lr"]) <= 1e-2 and v["model.n_layers"] in {"2", "3", "4"} for v in values)
    assert len({v["train.lr"] for v in values}) == 10  # a fresh draw per trial
    assert trials == sweep_trials("gpt", axes, samples=5, seed=3)  # a rerun finds the same trials
    assert trials != sweep_trials("gpt", axes, samples=5, seed=4)
    lr = values[0]["train.lr"]
    assert f"lr={lr}" in trials[0].name and len(lr.replace(".", "").replace("e-0", "").lstrip("0")) <= 4


def test_values_keep_commas_inside_yaml_lists():
    assert split_values("[a, b],[c]") == ["[a, b]", "[c]"]
    assert parse_axis("eval.prompts=[x, y],[z]").values == ("[x, y]", "[z]")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train.lr", "must look like section.key=value1,value2"),
        ("lr=1,2", "must look like"),
        ("train.lr=1,,2", "empty value"),
        ("train.lr=1,1", "repeats a value"),
        ("train.lr=loguniform:1e-2", "loguniform:LOW:HIGH"),
        ("train.lr=loguniform:0:1", "above 0"),
        ("train.lr=uniform:2:1", "LOW must be below HIGH"),
    ],
)
def test_bad_axes_are_refused_naming_the_axis(text, message):
    with pytest.raises(SweepError, match=message):
        parse_axis(text)


def test_a_key_swept_twice_and_samples_without_a_range_are_refused():
    with pytest.raises(SweepError, match="names a key twice"):
        parse_axes(["train.lr=1,2", "train.lr=3,4"])
    with pytest.raises(SweepError, match="loguniform"):
        sweep_trials("gpt", parse_axes(["train.lr=1,2"]), samples=3)


def test_trial_names_are_safe_directory_names_and_must_differ():
    assert combination_name("x", ["eval.prompts=[a b]"]) == "x-prompts=_a_b_"
    with pytest.raises(SweepError, match="same run name"):
        sweep_trials("gpt", parse_axes(["eval.prompts=[a b],[a_b]"]))
