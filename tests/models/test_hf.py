"""Weight mapping against transformers' own implementations: same weights in, same logits out (fp32)."""

import pytest
import torch
import transformers
from torch.testing import assert_close

from models import (
    BERT,
    GPT,
    TransformerConfig,
    hf_arch,
    load_hf_state_dict,
    to_hf,
    to_hf_config,
)

VOCAB, SEQ = 61, 10
TINY = dict(vocab_size=VOCAB, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
GPT2_CFG = TransformerConfig(family="gpt", d_ff=48, **TINY)
LLAMA_CFG = TransformerConfig(
    family="gpt",
    n_kv_heads=2,
    d_ff=48,
    activation="swiglu",
    norm="rmsnorm",
    position="rope",
    rope_theta=500.0,
    bias=False,
    tie_embeddings=False,
    **TINY,
)
BERT_CFG = TransformerConfig(
    family="bert",
    d_ff=48,
    gelu_approximate="none",
    norm_eps=1e-12,
    norm_position="post",
    type_vocab_size=2,
    pad_token_id=0,
    **TINY,
)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (norm weights, biases too) so a swapped or dropped tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def hf_model(hf_config):
    hf_config._attn_implementation = "eager"  # compare against plain matmul-softmax attention, not SDPA
    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "bert": transformers.BertForMaskedLM,
    }[hf_config.model_type]
    return randomize_(cls(hf_config), seed=1)


def from_hf(hf, cfg: TransformerConfig):
    """Our model of cfg holding the HF model's weights."""
    ours = GPT(cfg) if cfg.family == "gpt" else BERT(cfg)
    load_hf_state_dict(ours, hf.state_dict())
    return ours


def tokens(batch=2, seed=0):
    return torch.randint(1, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [GPT2_CFG, LLAMA_CFG], ids=["gpt2", "llama-gqa"])
def test_causal_lm_from_hf_matches_logits(cfg):
    hf = hf_model(to_hf_config(cfg))
    ours = from_hf(hf, cfg)
    ids = tokens()
    assert_close(ours.eval()(ids).logits, hf(input_ids=ids).logits)


@pytest.mark.parametrize("cfg", [GPT2_CFG, LLAMA_CFG], ids=["gpt2", "llama-gqa"])
def test_causal_lm_to_hf_matches_logits(cfg):
    ours = randomize_(GPT(cfg), seed=2)
    ids = tokens()
    assert_close(to_hf(ours)(input_ids=ids).logits, ours(ids).logits)


def test_tied_llama_round_trip():
    cfg = TransformerConfig(**{**LLAMA_CFG.__dict__, "tie_embeddings": True})
    ours = randomize_(GPT(cfg), seed=3)
    hf = to_hf(ours)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = tokens()
    assert_close(from_hf(hf, cfg).eval()(ids).logits, ours(ids).logits)


def padded_batch():
    ids = tokens()
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0
    ids[1, 6:] = 0  # the pad token
    token_type_ids = (torch.arange(SEQ) >= 4).long().expand(2, SEQ)
    return dict(input_ids=ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def test_bert_from_hf_matches_logits_with_padding():
    hf = hf_model(to_hf_config(BERT_CFG))
    ours = from_hf(hf, BERT_CFG)
    batch = padded_batch()
    keep = batch["attention_mask"].bool()
    assert_close(ours.eval()(**batch).logits[keep], hf(**batch).logits[keep])


def test_bert_to_hf_matches_logits_with_padding():
    ours = randomize_(BERT(BERT_CFG), seed=4)
    batch = padded_batch()
    keep = batch["attention_mask"].bool()
    assert_close(to_hf(ours)(**batch).logits[keep], ours(**batch).logits[keep])


def test_bert_without_token_types_exports_a_zero_type():
    cfg = TransformerConfig(**{**BERT_CFG.__dict__, "type_vocab_size": 0})
    ours = randomize_(BERT(cfg), seed=5)
    hf = to_hf(ours)
    assert hf.config.type_vocab_size == 1
    batch = padded_batch()
    del batch["token_type_ids"]
    keep = batch["attention_mask"].bool()
    assert_close(hf(**batch).logits[keep], ours(**batch).logits[keep])


@pytest.mark.parametrize(
    ("cfg", "arch"), [(GPT2_CFG, "gpt2"), (LLAMA_CFG, "llama"), (BERT_CFG, "bert")], ids=["gpt2", "llama", "bert"]
)
def test_hf_arch_names_the_class(cfg, arch):
    assert hf_arch(cfg) == arch


@pytest.mark.parametrize(
    ("base", "change", "field"),
    [
        (GPT2_CFG, dict(position="sinusoidal"), "position"),
        (GPT2_CFG, dict(n_kv_heads=2), "n_kv_heads"),
        (GPT2_CFG, dict(norm="rmsnorm"), "norm"),
        (LLAMA_CFG, dict(activation="gelu"), "activation"),
        (BERT_CFG, dict(norm_position="pre"), "norm_position"),
    ],
)
def test_hf_arch_rejects_configs_without_equivalent(base, change, field):
    with pytest.raises(ValueError, match=f"model.{field}="):
        hf_arch(TransformerConfig(**{**base.__dict__, **change}))


def test_load_refuses_leftover_weights():
    hf = hf_model(to_hf_config(GPT2_CFG))
    with pytest.raises(ValueError, match="no place"):
        load_hf_state_dict(GPT(GPT2_CFG), {**hf.state_dict(), "transformer.h.9.ln_1.weight": torch.ones(32)})


def test_load_refuses_missing_weights():
    state = hf_model(to_hf_config(GPT2_CFG)).state_dict()
    del state["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match=r"missing Hugging Face weights: \['transformer.h.1.mlp.c_fc.weight'\]"):
        load_hf_state_dict(GPT(GPT2_CFG), state)


def test_gpt2_saved_from_the_base_model_with_its_mask_buffers_loads():
    """openai-community/gpt2's files: `h.0.attn.c_attn.weight` (no `transformer.`), the causal-mask
    buffers `attn.bias` / `attn.masked_bias`, and no lm_head (tied)."""
    hf = hf_model(to_hf_config(GPT2_CFG))
    stored = {name.removeprefix("transformer."): t for name, t in hf.state_dict().items() if name != "lm_head.weight"}
    stored |= {f"h.{i}.attn.{buffer}": torch.ones(1) for i in range(2) for buffer in ("bias", "masked_bias")}
    ours = GPT(GPT2_CFG)
    load_hf_state_dict(ours, stored)
    ids = tokens()
    assert_close(ours.eval()(ids).logits, hf(input_ids=ids).logits)


def test_bert_with_old_layernorm_names_a_pooler_and_an_nsp_head_loads():
    """bert-base-uncased's files: LayerNorm.gamma/beta, the pooler and next-sentence head (no place in a
    masked LM, left out), the decoder bias stored as cls.predictions.bias only."""
    hf = hf_model(to_hf_config(BERT_CFG))
    stored = {
        name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
        for name, t in hf.state_dict().items()
        if name not in ("cls.predictions.decoder.bias", "cls.predictions.decoder.weight")
    }
    stored |= {"bert.pooler.dense.weight": torch.ones(32, 32), "cls.seq_relationship.bias": torch.ones(2)}
    ours = BERT(BERT_CFG)
    load_hf_state_dict(ours, stored)
    batch = padded_batch()
    keep = batch["attention_mask"].bool()
    assert_close(ours.eval()(**batch).logits[keep], hf(**batch).logits[keep])
