"""The experiment config: typed sections, derived values, the override language, YAML I/O, reference.

    base.py       the Section base model and the validators' shared helpers
    sections.py   one pydantic model per YAML section (run, tokenizer, model, train, eval, ...)
    corpus.py     the data section and its sources
    pretrained.py the architecture and vocabulary read from Hugging Face files (model.init_from, tokenizer.path)
    schema.py     the root `Config` that holds them and resolves derived values on validation
    derived.py    derived values and the batch arithmetic (global = micro x accum x data-parallel size)
    overrides.py  `section.key=value` overrides, key paths, flatten/lookup of nested dicts
    io.py         load a YAML file (+ overrides) into a Config, dump one back; one-line errors
    reference.py  the Markdown reference of every field

Nothing here imports torch, deepspeed or ray, so a config validates anywhere in milliseconds. The
names below are the package's public interface.
"""

from pipeline.config.corpus import DataConfig, SourceConfig
from pipeline.config.io import dump_config, load_config
from pipeline.config.overrides import apply_override, config_changes, flatten, lookup, parse_override, to_plain
from pipeline.config.reference import config_reference_markdown
from pipeline.config.schema import Config
from pipeline.config.sections import (
    SECTIONS,
    ClusterConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "SECTIONS",
    "ClusterConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_override",
    "config_changes",
    "config_reference_markdown",
    "dump_config",
    "flatten",
    "load_config",
    "lookup",
    "parse_override",
    "to_plain",
]
