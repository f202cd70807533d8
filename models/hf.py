"""Hugging Face interoperability: which transformers class matches a TransformerConfig, its config, and the
weights in both directions.

  our GPT, learned positions + LayerNorm + GELU + biases   <->  GPT2LMHeadModel
  our GPT, rope + RMSNorm + SwiGLU (+ GQA, untied)        <->  LlamaForCausalLM
  our BERT, post-norm + learned positions + GELU + biases <->  BertForMaskedLM

Our attention projects q, k and v with one fused matrix; HF Llama and BERT keep three, so those are
split and concatenated along the output dimension. GPT-2's Conv1D stores weights as (in, out), the
transpose of nn.Linear. transformers is imported inside functions so models/ imports torch only.
"""

import re

import torch
import torch.nn as nn

from models.bert import BERT
from models.gpt import GPT
from models.layers import TransformerConfig

_HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}

# The HF config each architecture fixes; a differing TransformerConfig field has no equivalent there.
_REQUIRED = {
    "gpt2": dict(
        position="learned", norm="layernorm", norm_position="pre", activation="gelu", bias=True, type_vocab_size=0
    ),
    "llama": dict(position="rope", norm="rmsnorm", norm_position="pre", activation="swiglu", type_vocab_size=0),
    "bert": dict(position="learned", norm="layernorm", norm_position="post", activation="gelu", bias=True),
}

# Our module names -> HF module names, outside the blocks and inside block {i} (after the prefix).
_MODULES = {
    "gpt2": {
        "transformer.embed.tokens": "transformer.wte",
        "transformer.embed.positions": "transformer.wpe",
        "transformer.final_norm": "transformer.ln_f",
        "lm_head": "lm_head",
    },
    "llama": {
        "transformer.embed.tokens": "model.embed_tokens",
        "transformer.final_norm": "model.norm",
        "lm_head": "lm_head",
    },
    "bert": {
        "transformer.embed.tokens": "bert.embeddings.word_embeddings",
        "transformer.embed.positions": "bert.embeddings.position_embeddings",
        "transformer.embed.token_types": "bert.embeddings.token_type_embeddings",
        "transformer.embed.norm": "bert.embeddings.LayerNorm",
        "mlm_transform": "cls.predictions.transform.dense",
        "mlm_norm": "cls.predictions.transform.LayerNorm",
        "lm_head": "cls.predictions.decoder",
    },
}
_BLOCK_PREFIX = {"gpt2": "transformer.h.{}.", "llama": "model.layers.{}.", "bert": "bert.encoder.layer.{}."}
_BLOCK_MODULES = {
    "gpt2": {
        "attn_norm": "ln_1",
        "attn.qkv": "attn.c_attn",
        "attn.out": "attn.c_proj",
        "mlp_norm": "ln_2",
        "mlp.up": "mlp.c_fc",
        "mlp.down": "mlp.c_proj",
    },
    "llama": {
        "attn_norm": "input_layernorm",
        "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn.out": "self_attn.o_proj",
        "mlp_norm": "post_attention_layernorm",
        "mlp.gate": "mlp.gate_proj",
        "mlp.up": "mlp.up_proj",
        "mlp.down": "mlp.down_proj",
    },
    "bert": {
        "attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attn.out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "mlp.up": "intermediate.dense",
        "mlp.down": "output.dense",
        "mlp_norm": "output.LayerNorm",
    },
}

# HF state-dict keys that name the same tensor as another: (alias, canonical).
_TIED_EMBEDDINGS = {
    "gpt2": ("lm_head.weight", "transformer.wte.weight"),
    "llama": ("lm_head.weight", "model.embed_tokens.weight"),
    "bert": ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
}
_ALWAYS_TIED = {"bert": [("cls.predictions.bias", "cls.predictions.decoder.bias")]}


def hf_arch(cfg: TransformerConfig) -> str:
    """The HF architecture equivalent to cfg: "gpt2" | "llama" | "bert"; else a ValueError naming the field."""
    if cfg.family == "bert":
        arch = "bert"
    elif cfg.position in ("learned", "rope"):
        arch = "gpt2" if cfg.position == "learned" else "llama"
    else:
        raise ValueError(f"model.position={cfg.position!r} has no Hugging Face equivalent (use 'learned' or 'rope')")
    hf_class = _HF_CLASS[arch]
    for field, expected in _REQUIRED[arch].items():
        if getattr(cfg, field) != expected:
            raise ValueError(f"model.{field}={getattr(cfg, field)!r} has no {hf_class} equivalent (needs {expected!r})")
    if arch != "llama" and cfg.kv_heads != cfg.n_heads:
        raise ValueError(f"model.n_kv_heads={cfg.n_kv_heads} (grouped-query attention) has no {hf_class} equivalent")
    return arch


def _gelu_name(cfg: TransformerConfig) -> str:
    return "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu"


def to_hf_config(cfg: TransformerConfig):
    """The transformers config of hf_arch(cfg). Special-token ids other than padding are left unset
    (None): they belong to the tokenizer, and the exporter fills them in."""
    import transformers

    arch, tokens = hf_arch(cfg), dict(pad_token_id=cfg.pad_token_id, bos_token_id=None, eos_token_id=None)
    common = dict(
        vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, **tokens
    )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.ffn_dim,
            activation_function=_gelu_name(cfg),
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **common,
        )
    if arch == "llama":
        # Llama has attention dropout only: residual and embedding dropout have no equivalent.
        return transformers.LlamaConfig(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            attention_bias=cfg.bias,
            mlp_bias=cfg.bias,
            attention_dropout=cfg.dropout,
            hidden_act="silu",
            **common,
        )
    # HF BERT always adds a token-type embedding; a single all-zero type stands in for "none".
    return transformers.BertConfig(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ffn_dim,
        hidden_act=_gelu_name(cfg),
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=max(cfg.type_vocab_size, 1),
        layer_norm_eps=cfg.norm_eps,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        **common,
    )


def from_hf_config(hf_config) -> TransformerConfig:
    """The TransformerConfig of a GPT2, Llama or BERT transformers config; ValueError for other models."""
    kind, c = hf_config.model_type, hf_config
    common = dict(
        vocab_size=c.vocab_size,
        tie_embeddings=c.tie_word_embeddings,
        init_std=c.initializer_range,
        pad_token_id=c.pad_token_id,
    )
    if kind == "gpt2":
        return TransformerConfig(
            family="gpt",
            max_seq_len=c.n_positions,
            d_model=c.n_embd,
            n_layers=c.n_layer,
            n_heads=c.n_head,
            d_ff=c.n_inner or 4 * c.n_embd,
            gelu_approximate=_gelu_approximate(c.activation_function),
            norm_eps=c.layer_norm_epsilon,
            dropout=c.resid_pdrop,
            **common,
        )
    if kind == "llama":
        # transformers 5 keeps rope settings in rope_parameters; 4.x had rope_theta and rope_scaling.
        rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
        if rope.get("rope_type", "default") != "default" or c.hidden_act != "silu" or c.attention_bias != c.mlp_bias:
            raise ValueError("only Llama configs with default rope, silu and attention_bias == mlp_bias map onto GPT")
        if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
            raise ValueError(f"Llama head_dim={c.head_dim} must be hidden_size / num_attention_heads")
        return TransformerConfig(
            family="gpt",
            max_seq_len=c.max_position_embeddings,
            d_model=c.hidden_size,
            n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads,
            d_ff=c.intermediate_size,
            activation="swiglu",
            norm="rmsnorm",
            norm_eps=c.rms_norm_eps,
            position="rope",
            rope_theta=rope["rope_theta"],
            bias=c.attention_bias,
            dropout=c.attention_dropout,
            **common,
        )
    if kind == "bert":
        return TransformerConfig(
            family="bert",
            max_seq_len=c.max_position_embeddings,
            d_model=c.hidden_size,
            n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads,
            d_ff=c.intermediate_size,
            gelu_approximate=_gelu_approximate(c.hidden_act),
            norm_eps=c.layer_norm_eps,
            norm_position="post",
            dropout=c.hidden_dropout_prob,
            type_vocab_size=c.type_vocab_size,
            **common,
        )
    raise ValueError(f"no mapping for Hugging Face model_type={kind!r} (supported: gpt2, llama, bert)")


def _gelu_approximate(hf_activation: str) -> str:
    approximations = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
    if hf_activation not in approximations:
        raise ValueError(f"activation {hf_activation!r} has no equivalent (supported: {sorted(approximations)})")
    return approximations[hf_activation]


def _hf_names(arch: str, our_name: str) -> tuple[str, ...]:
    """The HF key(s) of one of our parameters; several when ours is their concatenation (fused qkv)."""
    module, _, param = our_name.rpartition(".")
    in_block = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)", module)
    if in_block:
        prefix, hf_modules = _BLOCK_PREFIX[arch].format(in_block[1]), _BLOCK_MODULES[arch][in_block[2]]
    else:
        prefix, hf_modules = "", _MODULES[arch][module]
    hf_modules = (hf_modules,) if isinstance(hf_modules, str) else hf_modules
    return tuple(f"{prefix}{hf_module}.{param}" for hf_module in hf_modules)


def _is_conv1d(arch: str, hf_name: str, tensor: torch.Tensor) -> bool:
    return arch == "gpt2" and hf_name.startswith("transformer.h.") and tensor.dim() == 2


def _tied_keys(arch: str, cfg: TransformerConfig) -> list[tuple[str, str]]:
    return _ALWAYS_TIED.get(arch, []) + ([_TIED_EMBEDDINGS[arch]] if cfg.tie_embeddings else [])


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our GPT/BERT weights under hf_arch's names and layouts, as its HF model's state_dict() has them
    (tied aliases included), ready for load_state_dict. Tensors are fresh contiguous copies."""
    cfg = model.config
    arch, qkv_sizes = hf_arch(cfg), [cfg.d_model, cfg.kv_dim, cfg.kv_dim]
    hf_state = {}
    for name, tensor in model.named_parameters():  # tied weights appear once
        hf_names = _hf_names(arch, name)
        parts = tensor.detach().split(qkv_sizes, dim=0) if len(hf_names) == 3 else [tensor.detach()]
        for hf_name, part in zip(hf_names, parts):
            part = part.t() if _is_conv1d(arch, hf_name, part) else part
            hf_state[hf_name] = part.clone(memory_format=torch.contiguous_format)
    for alias, canonical in _tied_keys(arch, cfg):
        hf_state[alias] = hf_state[canonical]
    if arch == "bert" and not cfg.type_vocab_size:
        word_embeddings = hf_state["bert.embeddings.word_embeddings.weight"]
        hf_state["bert.embeddings.token_type_embeddings.weight"] = word_embeddings.new_zeros(1, cfg.d_model)
    return hf_state


def load_hf_state_dict(model: nn.Module, hf_state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an HF model's state_dict() into our model, whose config must match (see from_hf_config).
    Raises if an HF weight would be left unused, e.g. biases into a bias-free config."""
    arch, ours, used = hf_arch(model.config), {}, set()
    for name, _ in model.named_parameters():
        hf_names = _hf_names(arch, name)
        parts = [hf_state_dict[hf_name] for hf_name in hf_names]
        parts = [p.t() if _is_conv1d(arch, n, p) else p for n, p in zip(hf_names, parts)]
        ours[name] = torch.cat(parts, dim=0)
        used.update(hf_names)
    unused = set(hf_state_dict) - used - {alias for alias, _ in _tied_keys(arch, model.config)}
    if unused:
        raise ValueError(f"Hugging Face weights with no place in this model: {sorted(unused)}")
    # Only our tied aliases (lm_head.weight) are left missing, and they share the loaded tensor.
    model.load_state_dict(ours, strict=False)


def from_hf(hf_model) -> tuple[TransformerConfig, nn.Module]:
    """(config, our GPT or BERT) holding the weights of a GPT2LMHeadModel, LlamaForCausalLM or
    BertForMaskedLM."""
    cfg = from_hf_config(hf_model.config)
    model = GPT(cfg) if cfg.family == "gpt" else BERT(cfg)
    load_hf_state_dict(model, hf_model.state_dict())
    return cfg, model


def to_hf(model: nn.Module):
    """A transformers model (hf_arch's class) holding our model's weights, e.g. for save_pretrained."""
    import transformers

    hf_model = getattr(transformers, _HF_CLASS[hf_arch(model.config)])(to_hf_config(model.config))
    hf_model.load_state_dict(to_hf_state_dict(model))
    return hf_model.eval()
