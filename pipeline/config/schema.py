"""The root config model: the eight sections, resolved (derived values filled in and checked)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from pipeline.config.base import Section
from pipeline.config.derived import resolve_derived, unset_derivable_keys
from pipeline.config.pretrained import resolve_pretrained
from pipeline.config.sections import (
    ClusterConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
)


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and places.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpus and sharding.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="BPE tokenizer.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization and DeepSpeed.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation stage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray and workers.")

    # Dotted keys whose values were derived (the user left them unset): `dump_config` writes them back
    # as unset, so a dumped config re-derives them (after a world-size or vocabulary change too).
    _derived: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _resolve(self) -> Config:
        self._derived = unset_derivable_keys(self)
        resolve_pretrained(self)
        resolve_derived(self)
        return self

    def model_args(self) -> dict[str, Any]:
        """The model section as keyword arguments for `models.TransformerConfig`."""
        return self.model.model_dump(exclude={"pad_vocab_multiple", "init_from"})

    @property
    def data_parallel_size(self) -> int:
        return self.cluster.num_workers
