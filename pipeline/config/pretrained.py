"""Starting from Hugging Face files: the architecture of an HF model directory (`model.init_from`, from
its config.json) and the vocabulary size of an HF tokenizer (`tokenizer.path`, from its tokenizer.json).

Both are plain JSON, read at validation, so a config that starts from a checkpoint still validates in
milliseconds without torch or transformers. The weights themselves are loaded by the training layer
(pipeline/training/pretrained.py) through the mapping in models/hf.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config.base import check

# model_type -> the transformers class whose weights map onto ours.
SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}
SUPPORTED_TEXT = ", ".join(f"{cls} (model_type {kind})" for kind, cls in SUPPORTED.items())
# Keys that change no weight: the checkpoint's value is a default that an explicit setting overrides.
TRAINING_KEYS = ("dropout", "init_std")
TOKENIZER_FILE = "tokenizer.json"
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from path; a ValueError naming the file and `fix` if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc}); {fix}") from None
    check(isinstance(data, dict), f"{path}: expected a JSON object; {fix}")
    return data


def hf_model_keys(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Our model-section keys for an HF config.json (GPT-2, Llama or BERT); ValueError naming `source`."""
    kind = hf.get("model_type")
    check(
        kind in SUPPORTED,
        f"{source}: model_type {kind!r} (architectures {hf.get('architectures')}) is not supported; "
        f"model.init_from takes {SUPPORTED_TEXT}",
    )

    def need(key: str) -> Any:
        check(
            key in hf, f"{source}: no `{key}`, which a {SUPPORTED[kind]} config.json has; re-save it with transformers"
        )
        return hf[key]

    common = {"vocab_size": need("vocab_size"), "init_std": hf.get("initializer_range", 0.02), "n_kv_heads": None}
    if kind == "gpt2":
        return common | {
            **_gpt_defaults(),
            "max_seq_len": need("n_positions"),
            "d_model": need("n_embd"),
            "n_layers": need("n_layer"),
            "n_heads": need("n_head"),
            "d_ff": hf.get("n_inner") or 4 * need("n_embd"),
            "gelu_approximate": _gelu(hf.get("activation_function", "gelu_new"), source),
            "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": hf.get("tie_word_embeddings", True),
            "dropout": hf.get("resid_pdrop", 0.1),
        }
    if kind == "llama":
        return common | _llama_keys(hf, need, source)
    check(
        hf.get("position_embedding_type", "absolute") == "absolute",
        f"{source}: position_embedding_type={hf.get('position_embedding_type')!r}; only absolute positions map onto "
        "our BERT",
    )
    return common | {
        **_gpt_defaults(),
        "family": "bert",
        "norm_position": "post",
        "max_seq_len": need("max_position_embeddings"),
        "d_model": need("hidden_size"),
        "n_layers": need("num_hidden_layers"),
        "n_heads": need("num_attention_heads"),
        "d_ff": need("intermediate_size"),
        "gelu_approximate": _gelu(hf.get("hidden_act", "gelu"), source),
        "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "type_vocab_size": hf.get("type_vocab_size", 2),
        "tie_embeddings": hf.get("tie_word_embeddings", True),
        "dropout": hf.get("hidden_dropout_prob", 0.1),
    }


def _gpt_defaults() -> dict[str, Any]:
    """GPT-2's and BERT's shared choices: learned positions, LayerNorm, GELU, biases, pre-norm."""
    return {
        "family": "gpt",
        "activation": "gelu",
        "norm": "layernorm",
        "norm_position": "pre",
        "position": "learned",
        "rope_theta": 10000.0,
        "bias": True,
        "type_vocab_size": 0,
    }


def _llama_keys(hf: dict[str, Any], need, source: str) -> dict[str, Any]:
    # transformers 5 keeps the rope settings in rope_parameters; 4.x had rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    check(rope_type == "default", f"{source}: rope_type {rope_type!r} is not supported; only default RoPE maps")
    check(hf.get("hidden_act", "silu") == "silu", f"{source}: hidden_act {hf.get('hidden_act')!r}; Llama needs silu")
    bias = hf.get("attention_bias", False)
    check(bias == hf.get("mlp_bias", False), f"{source}: attention_bias and mlp_bias differ; ours has one `bias`")
    heads, d_model = need("num_attention_heads"), need("hidden_size")
    head_dim = hf.get("head_dim") or d_model // heads
    check(head_dim * heads == d_model, f"{source}: head_dim={head_dim} must be hidden_size / num_attention_heads")
    return {
        "family": "gpt",
        "max_seq_len": need("max_position_embeddings"),
        "d_model": d_model,
        "n_layers": need("num_hidden_layers"),
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "d_ff": need("intermediate_size"),
        "activation": "swiglu",
        "gelu_approximate": "tanh",
        "norm": "rmsnorm",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "norm_position": "pre",
        "position": "rope",
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "bias": bias,
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "type_vocab_size": 0,
        "dropout": hf.get("attention_dropout", 0.0),
    }


def _gelu(activation: str, source: str) -> str:
    check(activation in _GELU, f"{source}: activation {activation!r} is not supported (supported: {sorted(_GELU)})")
    return _GELU[activation]


def tokenizer_file(path: str | Path) -> Path:
    """tokenizer.json of a tokenizer directory, or the file itself."""
    path = Path(path)
    return path if path.suffix == ".json" and not path.is_dir() else path / TOKENIZER_FILE


def tokenizer_vocab_size(path: str | Path) -> int:
    """Embedding rows a tokenizer needs: its largest token id + 1 (model vocabulary and added tokens)."""
    file = tokenizer_file(path)
    fix = (
        "point tokenizer.path at a directory holding tokenizer.json (a fast tokenizer: "
        "`AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` writes one) or at that file"
    )
    data = read_json(file, fix)
    vocab = (data.get("model") or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [token["id"] for token in data.get("added_tokens") or []]
    check(bool(ids), f"{file}: the tokenizer has no vocabulary; {fix}")
    return max(ids) + 1


def resolve_pretrained(config) -> None:
    """Fill the model section from model.init_from's config.json and the tokenizer's vocabulary size
    from tokenizer.path (which defaults to the model's directory), in place. An architecture key set
    explicitly to another value, or a tokenizer larger than the model's embedding, is a ValueError
    naming both values."""
    model, tokenizer = config.model, config.tokenizer
    if model.init_from is not None:
        source = Path(model.init_from) / "config.json"
        fix = "point model.init_from at a directory saved by transformers' save_pretrained"
        for key, value in hf_model_keys(read_json(source, fix), str(source)).items():
            given = getattr(model, key)
            if key in model.model_fields_set and given is not None and key not in TRAINING_KEYS:
                check(given == value, f"model.{key}={given!r} disagrees with {source} ({value!r}); remove model.{key}")
            elif key not in model.model_fields_set or given is None:
                setattr(model, key, value)
        if tokenizer.path is None:
            check(
                tokenizer_file(model.init_from).is_file(),
                f"model.init_from={model.init_from} has no {TOKENIZER_FILE}; set tokenizer.path to its tokenizer",
            )
            tokenizer.path = model.init_from
    if tokenizer.path is None:
        check(
            not tokenizer.special_tokens,
            "tokenizer.special_tokens applies to an existing tokenizer only; set tokenizer.path (or "
            "model.init_from) or remove it",
        )
        return
    size = tokenizer_vocab_size(tokenizer.path)
    check(
        "vocab_size" not in tokenizer.model_fields_set or tokenizer.vocab_size == size,
        f"tokenizer.vocab_size={tokenizer.vocab_size} disagrees with {tokenizer_file(tokenizer.path)} ({size} "
        "tokens); remove tokenizer.vocab_size",
    )
    tokenizer.vocab_size = size
    check(
        model.init_from is None or size <= model.vocab_size,
        f"the tokenizer {tokenizer_file(tokenizer.path)} has {size} tokens, more than the {model.vocab_size} "
        f"embedding rows of {model.init_from}/config.json; use the model's own tokenizer (leave tokenizer.path unset)",
    )
