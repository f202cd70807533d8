"""GPT: causality, loss conventions, initialisation and generation on tiny random models."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from models import GPT, TransformerConfig, sample_next_token

TINY = dict(family="gpt", vocab_size=97, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
VARIANTS = {
    "gpt2": TransformerConfig(**TINY),
    "llama-gqa": TransformerConfig(
        **TINY, n_kv_heads=2, activation="swiglu", norm="rmsnorm", position="rope", bias=False, tie_embeddings=False
    ),
    "sinusoidal-post-norm": TransformerConfig(**TINY, position="sinusoidal", norm_position="post"),
}


def model_for(cfg: TransformerConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def prompt(batch=2, length=6, seed=0):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_future_tokens_do_not_change_earlier_logits(cfg):
    model = model_for(cfg)
    ids = prompt(length=10)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 97
    before, after = model(ids).logits, model(changed).logits
    assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_loss_at_init_is_near_uniform_and_backpropagates(cfg):
    model = model_for(cfg).train()
    window = prompt(batch=4, length=cfg.max_seq_len + 1)
    loss = model(window[:, :-1], labels=window[:, 1:]).loss
    assert abs(loss.item() - math.log(97)) < 0.1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_labels_are_already_aligned_and_minus_100_is_ignored():
    model = model_for(VARIANTS["gpt2"])
    ids, labels = prompt(length=8, seed=1), prompt(length=8, seed=2)
    labels[0, :3] = -100
    output = model(ids, labels=labels)
    kept = labels != -100
    assert_close(output.loss, F.cross_entropy(model(ids).logits[kept], labels[kept]))


def test_residual_projections_get_the_scaled_init():
    model = model_for(TransformerConfig(**{**TINY, "d_model": 128, "n_layers": 8}))
    block = model.transformer.blocks[0]
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(block.attn.out.weight.std().item() - expected) < 0.1 * expected
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    assert block.attn.qkv.bias.abs().max() == 0
    assert model.lm_head.weight is model.transformer.embed.tokens.weight


def test_greedy_generation_is_argmax_stepping():
    model = model_for(VARIANTS["llama-gqa"])
    ids = prompt()
    generated = model.generate(ids, max_new_tokens=5, temperature=0)
    expected = ids
    for _ in range(5):
        next_ids = model(expected).logits[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_ids], dim=1)
    assert torch.equal(generated, expected)
    assert torch.equal(model.generate(ids, max_new_tokens=5, temperature=0), generated)


def test_top_k_1_sampling_equals_greedy():
    model = model_for(VARIANTS["gpt2"])
    ids = prompt()
    greedy = model.generate(ids, max_new_tokens=5, temperature=0)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, max_new_tokens=5, temperature=1.0, top_k=1, generator=generator), greedy)


def test_seeded_sampling_is_reproducible():
    model = model_for(VARIANTS["gpt2"])
    ids = prompt()

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(ids, max_new_tokens=8, temperature=1.0, top_p=0.95, generator=generator)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_generation_crops_context_to_max_seq_len():
    model = model_for(VARIANTS["gpt2"])
    ids = prompt(length=16)  # already max_seq_len
    generated = model.generate(ids, max_new_tokens=3, temperature=0)
    assert generated.shape == (2, 19)
    last = model(generated[:, 2:-1]).logits[:, -1].argmax(-1)
    assert torch.equal(generated[:, -1], last)


def test_rows_stop_at_eos():
    model = model_for(VARIANTS["gpt2"])
    ids = prompt(batch=1)
    first = model.generate(ids, max_new_tokens=1, temperature=0)[0, -1].item()
    generated = model.generate(ids, max_new_tokens=5, temperature=0, eos_token_id=first)
    assert generated.shape == (1, 7)  # stopped right after emitting eos


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.6, 0.3, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, 1.0, top_p=0.5, generator=generator).item() for _ in range(50)}
    assert draws == {1}
    draws = {sample_next_token(logits, 1.0, top_p=0.8, generator=generator).item() for _ in range(200)}
    assert draws == {1, 2}
