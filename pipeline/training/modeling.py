"""From the pipeline's config to a `models` module: the one place that maps one onto the other."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from models import BERT, GPT, TransformerConfig
from pipeline.config import Config


def model_config(config: Config, pad_token_id: int | None = None) -> TransformerConfig:
    return TransformerConfig(**config.model_args(), pad_token_id=pad_token_id)


def build_model(config: Config, pad_token_id: int | None = None) -> torch.nn.Module:
    """A freshly initialized GPT or BERT, seeded by run.seed so every rank starts from the same weights."""
    cfg = model_config(config, pad_token_id)
    torch.manual_seed(config.run.seed)
    return GPT(cfg) if cfg.family == "gpt" else BERT(cfg)


class _SkipNormalInit(TorchFunctionMode):
    """Makes `nn.init.normal_` and `Tensor.normal_` no-ops. On the meta device they have no values to
    fill, and torch runs normal_ through a Python meta kernel whose first call imports torch._dynamo:
    1.3 s of the driver's and every rank's start-up, spent to count parameters (bench/startup.py)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.init.normal_, torch.Tensor.normal_):
            return args[0] if args else kwargs["tensor"]  # the tensor, as normal_ returns it
        return func(*args, **(kwargs or {}))


def meta_model(config: Config) -> torch.nn.Module:
    """The model's structure without memory or values: parameters on the meta device, for counting and
    planning (a 7B model "builds" in a second). torch's device context rather than
    accelerate.init_empty_weights, which re-creates each parameter and so unties tied embeddings."""
    with torch.device("meta"), _SkipNormalInit():
        return build_model(config)
