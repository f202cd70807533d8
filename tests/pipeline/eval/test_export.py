"""Hugging Face export: what transformers loads back offline behaves exactly like our model.

In-memory tests use randomly initialized tiny models with the tokenizer of the shard fixtures; the
slow tests export real checkpoints of 2-step training runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.testing import assert_close

from pipeline.config import load_config
from pipeline.data.special_tokens import special_token_ids
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import CheckpointError, ExportError
from pipeline.eval.export import check_exportable, export_hf, export_model, resolve_checkpoint
from pipeline.training.modeling import build_model

os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

TINY_MODEL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.max_seq_len=64",
    "tokenizer.vocab_size=512",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.max_steps=2",
    "train.warmup_steps=0",
    "cluster.num_workers=1",
]
ARCHITECTURES = {
    "gpt2": ["model.family=gpt"],
    "llama": [
        "model.family=gpt",
        "model.position=rope",
        "model.norm=rmsnorm",
        "model.activation=swiglu",
        "model.n_kv_heads=2",
        "model.bias=false",
        "model.tie_embeddings=false",
    ],
    "bert": ["model.family=bert", "model.norm_position=post", "model.gelu_approximate=none"],
}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}


def tiny_config(arch: str, *overrides: str):
    return load_config(None, [*TINY_MODEL, *ARCHITECTURES[arch], *overrides])


def random_model(config, seed: int = 0) -> torch.nn.Module:
    """Weights far from init (norms and biases too), so greedy choices are clear-cut and a swapped or
    dropped tensor would change them."""
    model = build_model(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def assert_greedy_generation_matches(model, export_dir, tokenizer_dir, *, varied: bool, prompt="def parse(text):"):
    """Greedy continuations equal token for token, and the logits they come from; `varied`: the
    continuation is not one token repeated (true of the randomized models, not of 2-step runs)."""
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    ours_tokenizer = load_tokenizer(tokenizer_dir)
    separator = special_token_ids(tokenizer_dir, "gpt").separator
    assert hf_tokenizer(prompt)["input_ids"] == ours_tokenizer.encode(prompt).ids
    assert hf_model.config.eos_token_id == hf_tokenizer.eos_token_id == separator
    ids = torch.tensor([[separator] + ours_tokenizer.encode(prompt).ids])
    ours = model.generate(ids, max_new_tokens=24, temperature=0, eos_token_id=separator)
    theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert theirs.tolist() == ours.tolist()
    assert len(set(ours[0, ids.shape[1] :].tolist())) > 1 or not varied
    assert_close(hf_model(ids).logits, model(ids).logits)
    return hf_model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_export_round_trip_generates_the_same_tokens(arch, tiny_shard_dir, tmp_path):
    config = tiny_config(arch)
    model = random_model(config)
    export_dir = export_model(model, tiny_shard_dir / "tokenizer", tmp_path / "hf", generation=config.eval)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(
        os.listdir(export_dir)
    )
    assert "manifest.json" not in os.listdir(export_dir)
    hf_model = assert_greedy_generation_matches(model, export_dir, tiny_shard_dir / "tokenizer", varied=True)
    assert type(hf_model).__name__ == HF_CLASS[arch]
    generation = json.loads((export_dir / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["temperature"], generation["top_k"]) == (True, 0.8, 50)


def test_bert_export_round_trip_gives_the_same_mlm_logits(tiny_bert_shard_dir, tmp_path):
    import transformers

    config = tiny_config("bert")
    model = random_model(config)
    export_dir = export_model(model, tiny_bert_shard_dir / "tokenizer", tmp_path / "hf")
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(export_dir)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    assert type(hf_model).__name__ == "BertForMaskedLM"
    assert not (export_dir / "generation_config.json").exists()
    special = special_token_ids(tiny_bert_shard_dir / "tokenizer", "bert")
    assert (hf_tokenizer.mask_token_id, hf_model.config.pad_token_id) == (special.mask, special.pad)
    ids = torch.tensor([hf_tokenizer("import os\nprint(os.getcwd())")["input_ids"]])
    ids[0, 2] = special.mask
    assert_close(hf_model(input_ids=ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "override, key", [("model.position=sinusoidal", "model.position"), ("model.norm=rmsnorm", "model.norm")]
)
def test_models_without_a_hf_equivalent_are_refused_naming_the_key(override, key, tiny_shard_dir, tmp_path):
    config = tiny_config("gpt2", override)
    with pytest.raises(ExportError, match=key):
        check_exportable(config)
    with pytest.raises(ExportError, match=key):
        export_model(build_model(config), tiny_shard_dir / "tokenizer", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_replaces_a_previous_export_and_a_failed_one_leaves_it(tiny_shard_dir, tmp_path):
    config = tiny_config("gpt2")
    out = tmp_path / "hf"
    export_model(random_model(config, seed=1), tiny_shard_dir / "tokenizer", out)
    first = (out / "model.safetensors").read_bytes()
    export_model(random_model(config, seed=2), tiny_shard_dir / "tokenizer", out)
    second = (out / "model.safetensors").read_bytes()
    assert second != first
    with pytest.raises(ExportError, match="tokenizer.json"):
        export_model(random_model(config, seed=3), tmp_path / "no-tokenizer", out)
    assert (out / "model.safetensors").read_bytes() == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left behind


def test_missing_or_incomplete_checkpoints_are_named(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no checkpoint; train the run first"):
        resolve_checkpoint(run_dir)
    (run_dir / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000004" / "COMPLETE").touch()
    (run_dir / "checkpoints" / "step-00000008").mkdir()
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint; pick one of \['step-00000004'\]"):
        resolve_checkpoint(run_dir, "step-00000008")
    assert resolve_checkpoint(run_dir, "step-00000004").name == "step-00000004"


# ---------------------------------------------------------------------------------------------
# From a real training run (the trained_run fixture: tests/pipeline/conftest.py)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_export_of_a_trained_run_round_trips(arch, trained_run, tmp_path):
    import transformers

    from pipeline.eval.export import load_checkpoint_model

    config, run_dir, shard_dir = trained_run(arch)
    export_dir = export_hf(config, run_dir, tmp_path / "export", tokenizer_dir=shard_dir / "tokenizer")
    model, tag = load_checkpoint_model(config, run_dir)
    assert tag == "step-00000002"
    if arch == "bert":
        hf_model = transformers.AutoModelForMaskedLM.from_pretrained(export_dir)
        ids = torch.randint(5, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        assert_close(hf_model(input_ids=ids).logits, model(ids).logits)
    else:
        assert_greedy_generation_matches(model, export_dir, shard_dir / "tokenizer", varied=False)
