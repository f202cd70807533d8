"""The engine wrapper's pure parts: LR schedule, weight-decay groups, activation checkpointing.
(DeepSpeed engines, checkpoints and fp32 consolidation run in tests/pipeline/training/test_train.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.training.engine import enable_activation_checkpointing, param_groups
from pipeline.training.modeling import build_model
from pipeline.training.schedule import lr_multiplier
from tests.fresh_process import fresh_python_output

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "tokenizer.vocab_size=320"]


def schedule(step, *, warmup=10, max_steps=110, kind="cosine", min_ratio=0.1, **wsd):
    keys = {"warmup_steps": warmup, "max_steps": max_steps, "schedule": kind, "min_lr_ratio": min_ratio, **wsd}
    return lr_multiplier(step, load_config(None, [f"train.{key}={value}" for key, value in keys.items()]).train)


def test_warmup_is_linear_and_the_first_step_learns():
    assert [schedule(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert schedule(10) == pytest.approx(1.0)


@pytest.mark.parametrize("kind, midpoint", [("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)])
def test_decay_reaches_min_lr_ratio_at_max_steps(kind, midpoint):
    assert schedule(60, kind=kind) == pytest.approx(midpoint)
    end = 1.0 if kind == "constant" else 0.1
    assert schedule(110, kind=kind) == pytest.approx(end)
    assert schedule(500, kind=kind) == pytest.approx(end)  # max_steps raised on resume: stays at the floor


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_holds_the_peak_then_decays_over_its_last_fraction(shape):
    wsd = {"kind": "wsd", "decay_fraction": 0.2, "decay_shape": shape}  # 110 steps: decay from step 88
    assert [schedule(s, **wsd) for s in (9, 10, 50, 87, 88)] == pytest.approx([1.0] * 5)
    progress = (99 - 88) / 22
    decay = 1 - progress if shape == "linear" else 1 - math.sqrt(progress)
    assert schedule(99, **wsd) == pytest.approx(0.1 + 0.9 * decay)
    assert schedule(110, **wsd) == pytest.approx(0.1) and schedule(300, **wsd) == pytest.approx(0.1)


def test_wsd_needs_room_for_warmup_and_decay():
    with pytest.raises(ConfigError, match=r"train.warmup_steps=90 and the WSD decay .* overlap"):
        load_config(None, ["train.schedule=wsd", "train.warmup_steps=90", "train.max_steps=100"])
    load_config(None, ["train.schedule=wsd", "train.warmup_steps=90", "train.max_steps=200"])  # the fix


def test_cosine_shape_and_no_warmup():
    assert schedule(35, kind="cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule(0, warmup=0, max_steps=100, min_ratio=0.0) == pytest.approx(1.0)
    assert schedule(100, warmup=0, max_steps=100, min_ratio=0.0) == pytest.approx(0.0)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_weight_decay_skips_norms_biases_and_embeddings(family):
    model = build_model(load_config(None, [*TINY, f"model.family={family}"]))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed and all(name.endswith("weight") and "norm" not in name and "embed" not in name for name in decayed)
    assert "transformer.embed.tokens.weight" in not_decayed  # also the tied lm_head
    assert any(name.endswith("bias") for name in not_decayed) and any("norm" in name for name in not_decayed)
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))  # each tied parameter once


def test_activation_checkpointing_keeps_the_gradients():
    config = load_config(None, TINY)
    plain, recomputed = build_model(config), build_model(config)
    enable_activation_checkpointing(recomputed)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (plain, recomputed):
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_a_rank_imports_deepspeed_without_mlflow_and_mlflow_still_imports_after():
    """DeepSpeed's autotuner imports mlflow at import (1 s of every rank's start-up); the ranks keep it
    out, and leave `import mlflow` working for whoever needs it later in the process."""
    script = (
        "import sys\n"
        "import pipeline.training.loop\n"
        "from deepspeed.autotuning import autotuner\n"
        "assert 'mlflow' not in sys.modules and not autotuner.has_mlflow\n"
        "import mlflow\n"
        "print(mlflow.__name__)\n"
    )
    assert fresh_python_output(script) == "mlflow"
