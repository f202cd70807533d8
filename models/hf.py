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
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

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
_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}
# Tensors HF checkpoints may hold that no model of ours has: buffers, BERT's pooler and NSP head.
_IGNORED = {
    "gpt2": r".*\.attn\.(masked_)?bias",
    "llama": r".*rotary_emb\.inv_freq",
    "bert": r"bert\.embeddings\.position_ids|bert\.pooler\..*|cls\.seq_relationship\..*",
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


def hf_tensor_names(cfg: TransformerConfig, stored: Iterable[str]) -> dict[str, str]:
    """{HF name as its model's state_dict() has it: name as stored in a checkpoint}. Checkpoints saved
    from the base model lack its prefix (`h.0.` for `transformer.h.0.`), old BERT ones call LayerNorm's
    weight and bias gamma and beta, and tied weights may be stored under their alias only. Buffers and
    heads no model of ours has (GPT-2's causal-mask `attn.bias`, BERT's pooler and NSP head) are left out."""
    arch = hf_arch(cfg)
    names = {}
    for name in stored:
        canonical = re.sub(
            r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        )
        if not canonical.startswith((_BASE_PREFIX[arch], "lm_head.", "cls.")):
            canonical = _BASE_PREFIX[arch] + canonical
        if not re.fullmatch(_IGNORED[arch], canonical):
            names[canonical] = name
    for alias, canonical in _tied_keys(arch, cfg):
        if canonical not in names and alias in names:
            names[canonical] = names[alias]
    return names


def check_hf_tensor_names(model: nn.Module, names: dict[str, str]) -> None:
    """ValueError naming the HF weights our model needs that are missing, or that it has no place for
    (e.g. biases into a bias-free config)."""
    arch = hf_arch(model.config)
    needed = {hf_name for name, _ in model.named_parameters() for hf_name in _hf_names(arch, name)}
    missing = sorted(needed - set(names))
    if missing:
        raise ValueError(f"missing Hugging Face weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unused = set(names) - needed - {alias for alias, _ in _tied_keys(arch, model.config)}
    if unused:
        raise ValueError(f"Hugging Face weights with no place in this model: {sorted(unused)[:5]}")


def parameter_from_hf(cfg: TransformerConfig, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Our parameter `name` from the HF tensors `read(hf_name)` returns: q, k and v concatenated into our
    fused qkv, GPT-2's Conv1D weights transposed."""
    arch = hf_arch(cfg)
    hf_names = _hf_names(arch, name)
    parts = [read(hf_name) for hf_name in hf_names]
    return torch.cat([p.t() if _is_conv1d(arch, n, p) else p for n, p in zip(hf_names, parts)], dim=0)


def load_hf_state_dict(model: nn.Module, hf_state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an HF checkpoint's tensors (as stored: see hf_tensor_names) into our model, whose config
    must describe the same architecture. Raises ValueError if a weight is missing or left unused."""
    names = hf_tensor_names(model.config, hf_state_dict)
    check_hf_tensor_names(model, names)
    ours = {
        name: parameter_from_hf(model.config, name, lambda hf_name: hf_state_dict[names[hf_name]])
        for name, _ in model.named_parameters()
    }
    # Only our tied aliases (lm_head.weight) are left missing, and they share the loaded tensor.
    model.load_state_dict(ours, strict=False)


def to_hf(model: nn.Module):
    """A transformers model (hf_arch's class) holding our model's weights, e.g. for save_pretrained."""
    import transformers

    hf_model = getattr(transformers, _HF_CLASS[hf_arch(model.config)])(to_hf_config(model.config))
    hf_model.load_state_dict(to_hf_state_dict(model))
    return hf_model.eval()
