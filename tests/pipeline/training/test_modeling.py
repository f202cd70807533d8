"""The config-to-model mapping: the meta-device model used to count and plan has the real model's
structure, and building it costs no torch._dynamo import (part of every run's start-up)."""

from __future__ import annotations

import pytest
import torch

from models.layers import num_parameters
from pipeline.config import load_config
from pipeline.training.modeling import build_model, meta_model
from tests.fresh_process import fresh_python_output

FAMILIES = {
    "gpt-tied": ["model.n_layers=2", "model.d_model=64", "tokenizer.vocab_size=512"],
    "llama-untied": [
        *("model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "tokenizer.vocab_size=512"),
        *("model.activation=swiglu", "model.norm=rmsnorm", "model.position=rope", "model.bias=false"),
        "model.tie_embeddings=false",
    ],
    "bert": ["model.family=bert", "model.n_layers=2", "model.d_model=64", "tokenizer.vocab_size=512"],
}


@pytest.mark.parametrize("overrides", FAMILIES.values(), ids=FAMILIES.keys())
def test_the_meta_model_has_the_real_models_parameters(overrides):
    config = load_config(None, overrides)
    meta, real = meta_model(config), build_model(config)
    assert all(p.is_meta for p in meta.parameters())
    assert [(name, p.shape) for name, p in meta.named_parameters()] == [
        (name, p.shape) for name, p in real.named_parameters()
    ]
    assert num_parameters(meta) == num_parameters(real)
    assert num_parameters(meta, exclude_embeddings=True) == num_parameters(real, exclude_embeddings=True)


def test_normal_init_runs_again_after_the_meta_model():
    config = load_config(None, FAMILIES["gpt-tied"])
    meta_model(config)
    weight = build_model(config).transformer.embed.tokens.weight
    assert weight.std().item() == pytest.approx(config.model.init_std, rel=0.1)
    assert torch.empty(1000).normal_().std().item() > 0.5


def test_counting_parameters_imports_no_dynamo():
    script = (
        "import sys\n"
        "from pipeline.config import load_config\n"
        "from pipeline.training.loop import count_parameters\n"
        "assert count_parameters(load_config('configs/gpt2-124m.yaml')) > 100_000_000\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    assert fresh_python_output(script) == "False"
