import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_help_lists_subcommands():
    out = pretrain("--help")
    assert out.returncode == 0
    for command in ("config", "plan"):
        assert command in out.stdout


def test_config_check_reports_bad_override_in_one_line_without_traceback():
    out = pretrain("config", "check", "configs/gpt-tiny.yaml", "model.n_heads=5")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: configs/gpt-tiny.yaml: model.n_heads=5 must divide model.d_model=128"
    ]
    assert "Traceback" not in out.stderr


def test_config_check_accepts_a_preset():
    out = pretrain("config", "check", "configs/gpt-tiny.yaml")
    assert out.returncode == 0 and "ok" in out.stdout


def test_config_show_prints_resolved_yaml_with_overrides():
    out = pretrain("config", "show", "configs/gpt-tiny.yaml", "train.lr=5e-4")
    assert out.returncode == 0
    assert "lr: 0.0005" in out.stdout and "global_batch_size: 16" in out.stdout


def test_missing_config_file_is_a_clear_error():
    out = pretrain("plan", "configs/nope.yaml")
    assert out.returncode == 2 and "configs/nope.yaml: no such config file" in out.stderr


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_plan_runs_for_every_preset(preset, preset_overrides):
    out = pretrain("plan", str(preset.relative_to(REPO)), *preset_overrides(preset), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["params"] > 0 and plan["flops_per_token"] > 6 * plan["non_embedding_params"]


def test_plan_table_for_llama_1b_partitions_model_states():
    out = pretrain("plan", "configs/llama-1b.yaml")
    assert out.returncode == 0, out.stderr
    rows = {
        int(line.split()[0]): [float(v) for v in line.split()[1:5]]
        for line in out.stdout.splitlines()
        if line[:1].isdigit()
    }
    assert sorted(rows) == [0, 1, 2, 3]
    dp = 8
    assert rows[3][3] == pytest.approx(rows[0][3] / dp, abs=0.002)
    assert "1,100,048,384 parameters" in out.stdout


def test_config_show_output_can_be_edited_and_used(tmp_path):
    """Derived values are shown as null with a comment, so an edit that changes what they derive
    from (the vocabulary, the world size) works instead of contradicting the old derived values."""
    out = pretrain("config", "show", "configs/gpt-tiny.yaml")
    assert out.returncode == 0
    assert "# Derived from the values above" in out.stdout and "#   model.vocab_size: 4096" in out.stdout
    edited = out.stdout.replace("vocab_size: 4096", "vocab_size: 8192").replace("num_workers: 2", "num_workers: 1")
    config = tmp_path / "edited.yaml"
    config.write_text(edited)
    checked = pretrain("config", "check", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "global batch 8 = 8 x 1 x 1 workers" in checked.stdout
    shown = pretrain("config", "show", str(config))
    assert "#   model.vocab_size: 8192" in shown.stdout
