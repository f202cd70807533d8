"""From the pipeline's config to a `models` module: the one place that maps one onto the other."""

from __future__ import annotations

import torch

from models import BERT, GPT, TransformerConfig
from pipeline.config import Config


def model_config(config: Config, pad_token_id: int | None = None) -> TransformerConfig:
    return TransformerConfig(**config.model_args(), pad_token_id=pad_token_id)


def build_model(config: Config, pad_token_id: int | None = None) -> torch.nn.Module:
    """A freshly initialized GPT or BERT, seeded by run.seed so every rank starts from the same weights."""
    cfg = model_config(config, pad_token_id)
    torch.manual_seed(config.run.seed)
    return GPT(cfg) if cfg.family == "gpt" else BERT(cfg)
