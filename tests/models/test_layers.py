"""TransformerConfig rules, the shared blocks' maths, and the size arithmetic the planner relies on."""

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch.testing import assert_close

from models import (
    BERT,
    GPT,
    TransformerConfig,
    activation_memory_bytes,
    flops_per_token,
    matmul_parameters,
    num_parameters,
)
from models.layers import MLP, Block, apply_rope, make_norm, rope_cos_sin, sinusoidal_positions

TINY = dict(vocab_size=100, max_seq_len=32, d_model=64, n_layers=2, n_heads=4)


def test_ffn_dim_rules():
    assert TransformerConfig(family="gpt", **TINY).ffn_dim == 256
    assert (
        TransformerConfig(family="gpt", **{**TINY, "d_model": 4096}, activation="swiglu").ffn_dim == 10944
    )  # 10922 -> x64
    assert TransformerConfig(family="gpt", **TINY, activation="swiglu", d_ff=100).ffn_dim == 100


def test_config_derived_head_shapes():
    cfg = TransformerConfig(family="gpt", **TINY, n_kv_heads=2)
    assert (cfg.head_dim, cfg.kv_heads) == (16, 2)
    assert TransformerConfig(family="gpt", **TINY).kv_heads == 4


@pytest.mark.parametrize("bad", [dict(n_heads=5), dict(n_kv_heads=3)])
def test_config_rejects_indivisible_heads(bad):
    with pytest.raises(ValueError, match="must divide"):
        TransformerConfig(family="gpt", **{**TINY, **bad})


def test_rmsnorm_is_weight_only_and_scales_by_rms():
    norm = make_norm(TransformerConfig(family="gpt", **TINY, norm="rmsnorm", norm_eps=0.0))
    assert [name for name, _ in norm.named_parameters()] == ["weight"]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 64)
    assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).sqrt() * norm.weight)


def test_rope_scores_depend_only_on_relative_position():
    cfg = TransformerConfig(family="gpt", **TINY, position="rope")
    cos, sin = rope_cos_sin(12, cfg)
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)
    rotated_q = apply_rope(q.expand(1, 1, 12, -1), cos, sin)[0, 0]  # q at every position
    rotated_k = apply_rope(k.expand(1, 1, 12, -1), cos, sin)[0, 0]
    assert_close(rotated_q[0], q)  # position 0 is not rotated
    assert_close(rotated_q[7] @ rotated_k[3], rotated_q[9] @ rotated_k[5])
    assert not torch.allclose(rotated_q[7] @ rotated_k[3], rotated_q[7] @ rotated_k[5])


def test_sinusoidal_table_alternates_sin_and_cos():
    table = sinusoidal_positions(5, 8)
    assert table.shape == (5, 8)
    assert_close(table[3, 0], torch.tensor(math.sin(3.0)))
    assert_close(table[3, 1], torch.tensor(math.cos(3.0)))
    assert_close(table[3, 2], torch.tensor(math.sin(3.0 / 10000 ** (2 / 8))))


def test_swiglu_mlp_gates_with_silu():
    mlp = MLP(TransformerConfig(family="gpt", **TINY, activation="swiglu", bias=False))
    x = torch.randn(2, 5, 64)
    assert_close(mlp(x), mlp.down(F.silu(mlp.gate(x)) * mlp.up(x)))


def test_post_norm_block_ends_normalised_and_pre_norm_does_not():
    x = torch.randn(2, 5, 64) * 3 + 1
    post = Block(TransformerConfig(family="bert", **TINY, norm_position="post"))(x)
    assert_close(post.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    assert_close(post.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)
    pre = Block(TransformerConfig(family="gpt", **TINY))(x)
    assert pre.mean(-1).abs().max() > 0.1


@pytest.mark.parametrize("tie", [True, False])
def test_num_parameters_counts_tied_weights_once(tie):
    model = GPT(TransformerConfig(family="gpt", **TINY, tie_embeddings=tie))
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert num_parameters(model) == sum(distinct.values())
    embeddings = 100 * 64 + 32 * 64  # tokens + learned positions
    assert num_parameters(model, exclude_embeddings=True) == num_parameters(model) - embeddings
    assert num_parameters(GPT(TransformerConfig(family="gpt", **TINY, tie_embeddings=not tie))) - num_parameters(
        model
    ) == (100 * 64 if tie else -100 * 64)


def test_flops_per_token_by_hand():
    cfg = TransformerConfig(family="gpt", **TINY)
    per_layer = 4 * 64 * 64 + 2 * 64 * 256  # q, k, v, out + the two MLP matrices
    n = 2 * per_layer + 64 * 100  # + the projection to the vocabulary
    assert matmul_parameters(cfg) == n == 104704
    assert flops_per_token(cfg, seq_len=32) == 6 * 104704 + 12 * 2 * 64 * 32 == 677376


@pytest.mark.parametrize(
    "cfg",
    [
        TransformerConfig(family="gpt", **TINY, tie_embeddings=False),
        TransformerConfig(family="gpt", **TINY, n_kv_heads=1, activation="swiglu", position="rope", norm="rmsnorm"),
        TransformerConfig(family="bert", **TINY, norm_position="post", type_vocab_size=2),
    ],
    ids=["gpt2", "llama-gqa", "bert"],
)
def test_matmul_parameters_equal_the_models_linear_weights(cfg):
    model = GPT(cfg) if cfg.family == "gpt" else BERT(cfg)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameters(cfg) == linear_weights


def test_activation_memory_reproduces_korthikanti_without_attention_scores():
    cfg = TransformerConfig(family="gpt", **TINY, dropout=0.1)
    s, b, h = 32, 3, 64
    korthikanti_layers = 2 * s * b * h * 34  # their 16-bit per-layer figure, minus the 5as/h term
    head = s * b * (h * 2 + 100 * 4)
    assert activation_memory_bytes(cfg, micro_batch=b, seq_len=s, bytes_per_value=2) == korthikanti_layers + head
    no_dropout = TransformerConfig(family="gpt", **TINY)
    assert activation_memory_bytes(no_dropout, b, s, 2) == korthikanti_layers + head - 2 * s * b * h * 2


def test_7b_llama_shape_builds_on_meta():
    cfg = TransformerConfig(
        family="gpt",
        vocab_size=32000,
        max_seq_len=4096,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        d_ff=11008,
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        position="rope",
        bias=False,
        tie_embeddings=False,
    )
    with init_empty_weights():
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert num_parameters(model) == 6_738_415_616  # Llama-2-7B's published count


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_chunked_loss_equals_the_whole_logits_loss_and_gradients(family, monkeypatch):
    """Many chunks (a few rows each) against F.cross_entropy over the whole fp32 logits: same summed
    loss and same gradients for every parameter."""
    import models.layers
    from models import BERT, GPT

    cfg = TransformerConfig(family=family, vocab_size=97, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    model = GPT(cfg) if family == "gpt" else BERT(cfg)
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(2))
    labels[labels % 3 == 0] = -100  # some targets ignored (BERT: the unmasked positions)
    logits = model(ids).logits
    reference = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    expected = torch.autograd.grad(reference, list(model.parameters()))
    monkeypatch.setattr(models.layers, "LOSS_CHUNK_ELEMENTS", 97 * 5)  # 5 rows a chunk
    loss = model(ids, labels=labels, loss_reduction="sum").loss
    assert_close(loss, reference)
    for got, want in zip(torch.autograd.grad(loss, list(model.parameters())), expected):
        assert_close(got, want, atol=1e-6, rtol=1e-5)
    mean = model(ids, labels=labels).loss
    assert_close(mean, reference / (labels != -100).sum())


def test_a_batch_without_targets_has_zero_loss():
    from models import GPT

    cfg = TransformerConfig(family="gpt", vocab_size=97, max_seq_len=16, d_model=32, n_layers=1, n_heads=4)
    model = GPT(cfg)
    ids = torch.randint(0, 97, (2, 8))
    assert model(ids, labels=torch.full_like(ids, -100)).loss.item() == 0.0
