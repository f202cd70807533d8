"""Planning a sweep (no Ray): the refusals that come before anything runs, and their fixes followed."""

from __future__ import annotations

import pytest

from pipeline.errors import SweepError
from pipeline.sweep.driver import SweepOptions, plan_sweep
from pipeline.sweep.record import SweepRecord, sweep_dir_of
from tests.pipeline.run.test_orchestrate import PRESET


def test_asha_without_in_loop_validation_is_refused_and_setting_eval_every_fixes_it(tmp_path):
    asha = SweepOptions(early_stop="asha")
    axes = [f"run.workdir={tmp_path}", "train.lr=1e-3,3e-3"]
    with pytest.raises(SweepError, match=r"set train.eval_every=N"):
        plan_sweep(PRESET, [*axes, "train.eval_every=0"], asha)
    plan = plan_sweep(PRESET, [*axes, "train.eval_every=5"], asha)  # the message's fix
    assert [trial.name for trial in plan.trials] == ["gpt-tiny-lr=1e-3", "gpt-tiny-lr=3e-3"]


def test_a_trial_whose_config_is_invalid_is_named_before_anything_runs(tmp_path):
    with pytest.raises(SweepError, match=r"trial gpt-tiny-n_heads=5 \(model.n_heads=5\): .*must divide"):
        plan_sweep(PRESET, [f"run.workdir={tmp_path}", "model.n_heads=4,5"], SweepOptions())


def test_other_axes_under_a_sweeps_name_are_refused_and_a_new_name_starts_a_new_sweep(tmp_path):
    def record(*axes: str) -> SweepRecord:
        plan = plan_sweep(PRESET, [f"run.workdir={tmp_path}", *axes], SweepOptions())
        identity = {"axes": [f"{a.key}={a.values_text}" for a in plan.axes], "samples": 1, "seed": 0}
        sweep_dir = sweep_dir_of(plan.base)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return SweepRecord.open(sweep_dir, identity, plan.trials)

    record("train.lr=1e-3,3e-3")
    with pytest.raises(SweepError, match=r"name a new sweep with run.name=NAME"):
        record("train.lr=1e-2,3e-2")
    fresh = record("train.lr=1e-2,3e-2", "run.name=wider")  # the message's fix
    assert sorted(fresh.trials) == ["wider-lr=1e-2", "wider-lr=3e-2"]
    assert record("train.lr=1e-3,3e-3").trials["gpt-tiny-lr=1e-3"]["status"] == "pending"  # the first one goes on
