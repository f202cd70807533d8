"""Fixtures shared by the whole suite: real, tiny token shards built by the tokenizer and shard stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# About 2 MB of stdlib source -> about 1M tokens with a 512-token vocabulary, ~12 validation
# documents, several shards per split (so loader windows cross shard boundaries). One worker:
# no Ray start-up, so building one fixture takes seconds.
TINY_DATA_OVERRIDES = [
    "data.max_documents=120",
    "data.val_permille=100",
    "data.shard_tokens=65536",
    "data.num_workers=1",
    "tokenizer.vocab_size=512",
    "tokenizer.sample_bytes=1000000",
]


def build_tiny_shards(workdir: Path, family: str) -> Path:
    from pipeline.config import load_config
    from pipeline.data.shard import shard_stage

    config = load_config(None, [f"run.workdir={workdir}", f"model.family={family}", *TINY_DATA_OVERRIDES])
    return shard_stage(config).path


@pytest.fixture(scope="session")
def tiny_shard_dir(tmp_path_factory) -> Path:
    """GPT-family shards (index.json, train/val shards, tokenizer/ with the tokenizer files)."""
    return build_tiny_shards(tmp_path_factory.mktemp("tiny-gpt"), "gpt")


@pytest.fixture(scope="session")
def tiny_bert_shard_dir(tmp_path_factory) -> Path:
    """BERT-family shards, like tiny_shard_dir but with [PAD] [CLS] [SEP] [MASK] [UNK]."""
    return build_tiny_shards(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A fresh run.workdir for tests that build stages of their own."""
    return tmp_path / "work"


@pytest.fixture(scope="session")
def preset_overrides(tmp_path_factory):
    """preset_overrides(path) -> the overrides a preset needs to load here: a preset that continues from
    a Hugging Face directory (model.init_from) gets a stand-in with the real model's config.json and
    vocabulary size, made once."""
    import yaml

    made: list[Path] = []

    def overrides(preset: Path) -> list[str]:
        if "init_from" not in (yaml.safe_load(preset.read_text()).get("model") or {}):
            return []
        if not made:
            from tests.hf_checkpoints import gpt2_124m_description

            made.append(gpt2_124m_description(tmp_path_factory.mktemp("gpt2")))
        return [f"model.init_from={made[0]}"]

    return overrides
