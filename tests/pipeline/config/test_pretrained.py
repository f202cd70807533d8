"""model.init_from and tokenizer.path at validation: the architecture from config.json, the vocabulary
from tokenizer.json, and one-line errors whose fix is then applied and loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models import TransformerConfig, to_hf_config
from pipeline.config import dump_config, load_config
from pipeline.config.pretrained import hf_model_keys
from pipeline.errors import ConfigError
from tests.hf_checkpoints import make_hf_dir, make_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_dir(root, kind) for kind in ("gpt2", "llama", "bert")}


def error_of(overrides: list[str], path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("gpt2", dict(family="gpt", position="learned", norm="layernorm", n_kv_heads=None, tie_embeddings=True)),
        ("llama", dict(family="gpt", position="rope", norm="rmsnorm", activation="swiglu", n_kv_heads=2)),
        ("bert", dict(family="bert", norm_position="post", type_vocab_size=2, gelu_approximate="none")),
    ],
)
def test_architecture_and_vocabulary_come_from_the_directory(hf_dirs, kind, expected):
    config = load_config(None, [f"model.init_from={hf_dirs[kind]}"])
    hf = json.loads((hf_dirs[kind] / "config.json").read_text())
    assert {key: getattr(config.model, key) for key in expected} == expected
    assert (config.model.d_model, config.model.n_layers, config.model.max_seq_len) == (32, 2, 64)
    assert config.model.vocab_size == config.tokenizer.vocab_size == hf["vocab_size"]  # not padded to 64
    assert config.tokenizer.path == str(hf_dirs[kind])
    assert config.train.seq_len == 64


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_a_dumped_config_loads_back_equal(hf_dirs, kind, tmp_path):
    config = load_config(None, [f"model.init_from={hf_dirs[kind]}", "train.seq_len=32"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_mapping_round_trips_every_exportable_architecture():
    shapes = dict(vocab_size=61, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=48)
    configs = [
        TransformerConfig(family="gpt", **shapes),
        TransformerConfig(
            family="gpt",
            n_kv_heads=2,
            activation="swiglu",
            norm="rmsnorm",
            position="rope",
            rope_theta=500.0,
            bias=False,
            tie_embeddings=False,
            **shapes,
        ),  # fmt: skip
        TransformerConfig(family="bert", norm_position="post", gelu_approximate="none", type_vocab_size=2, **shapes),
    ]
    for cfg in configs:
        keys = hf_model_keys(to_hf_config(cfg).to_dict(), "test")
        assert TransformerConfig(**keys, pad_token_id=cfg.pad_token_id) == cfg


def test_an_explicit_key_that_disagrees_names_both_values_and_removing_it_loads(hf_dirs, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(f"model:\n  init_from: {hf_dirs['llama']}\n  d_model: 64\n  dropout: 0.1\n")
    message = error_of([], path)
    assert "model.d_model=64 disagrees with" in message and "(32)" in message and "remove model.d_model" in message
    path.write_text(f"model:\n  init_from: {hf_dirs['llama']}\n  dropout: 0.1\n")
    config = load_config(path)
    assert (config.model.d_model, config.model.dropout) == (32, 0.1)  # dropout is no architecture key


def test_a_bert_checkpoint_with_family_gpt_is_refused(hf_dirs):
    message = error_of([f"model.init_from={hf_dirs['bert']}", "model.family=gpt"])
    assert "model.family='gpt' disagrees with" in message and "('bert')" in message
    assert load_config(None, [f"model.init_from={hf_dirs['bert']}"]).model.family == "bert"


def test_an_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    message = error_of([f"model.init_from={tmp_path}"])
    assert "model_type 't5'" in message
    assert all(name in message for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "BertForMaskedLM"))


def test_a_directory_without_config_json_says_how_to_make_one(tmp_path):
    message = error_of([f"model.init_from={tmp_path}"])
    assert f"{tmp_path}/config.json: no such file" in message and "save_pretrained" in message


def test_a_tokenizer_larger_than_the_embedding_is_refused(hf_dirs, tmp_path):
    big = tmp_path / "big"
    save_tokenizer(make_tokenizer("bert"), big, "bert")  # 500 tokens; the GPT-2 model has 400 rows
    message = error_of([f"model.init_from={hf_dirs['gpt2']}", f"tokenizer.path={big}"])
    assert "has 500 tokens, more than the 400 embedding rows" in message and "leave tokenizer.path unset" in message
    assert load_config(None, [f"model.init_from={hf_dirs['gpt2']}"]).tokenizer.vocab_size == 400


def test_a_model_directory_without_a_tokenizer_asks_for_tokenizer_path(hf_dirs, tmp_path):
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    shutil.copy(hf_dirs["gpt2"] / "config.json", weights_only)
    message = error_of([f"model.init_from={weights_only}"])
    assert "has no tokenizer.json; set tokenizer.path" in message
    config = load_config(None, [f"model.init_from={weights_only}", f"tokenizer.path={hf_dirs['gpt2']}"])
    assert config.tokenizer.vocab_size == 400


def test_tokenizer_path_sets_the_vocabulary_and_a_disagreeing_size_is_named(hf_dirs):
    config = load_config(None, [f"tokenizer.path={hf_dirs['bert']}", "model.family=bert"])
    assert (config.tokenizer.vocab_size, config.model.vocab_size) == (500, 512)  # padded: a fresh model
    message = error_of([f"tokenizer.path={hf_dirs['bert']}", "tokenizer.vocab_size=8192"])
    assert "tokenizer.vocab_size=8192 disagrees with" in message and "(500 tokens)" in message
    single_file = load_config(None, [f"tokenizer.path={hf_dirs['gpt2'] / 'tokenizer.json'}"])
    assert single_file.tokenizer.vocab_size == 400


def test_special_tokens_need_an_existing_tokenizer():
    message = error_of(["tokenizer.special_tokens.eos=</s>"])
    assert "tokenizer.special_tokens applies to an existing tokenizer only" in message
