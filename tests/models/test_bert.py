"""BERT: padding invariance, bidirectionality, token types and the MLM loss on tiny random models."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from models import BERT, TransformerConfig

TINY = dict(family="bert", vocab_size=97, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, pad_token_id=0)
VARIANTS = {
    "bert-base-style": TransformerConfig(**TINY, norm_position="post", gelu_approximate="none", type_vocab_size=2),
    "pre-norm-rope-swiglu": TransformerConfig(
        **TINY, position="rope", norm="rmsnorm", activation="swiglu", n_kv_heads=2
    ),
}


def model_for(cfg: TransformerConfig, seed: int = 0) -> BERT:
    torch.manual_seed(seed)
    return BERT(cfg).eval()


def tokens(batch=2, length=10, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_padding_does_not_change_real_tokens(cfg):
    model = model_for(cfg)
    ids = tokens(batch=1, length=6)
    alone = model(ids).logits
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = (padded != 0).long()
    assert_close(model(padded, attention_mask=mask).logits[:, :6], alone)
    # Without the mask the padding is attended to, so the test above can fail.
    assert not torch.allclose(model(padded).logits[:, :6], alone, atol=1e-4)


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_attention_is_bidirectional(cfg):
    model = model_for(cfg)
    ids = tokens()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 97
    assert not torch.allclose(model(ids).logits[:, 0], model(changed).logits[:, 0])


def test_token_types_change_the_output():
    model = model_for(VARIANTS["bert-base-style"])
    ids = tokens()
    segments = (torch.arange(10) >= 5).long().expand(2, 10)
    assert_close(model(ids).logits, model(ids, token_type_ids=torch.zeros_like(ids)).logits)
    assert not torch.allclose(model(ids).logits, model(ids, token_type_ids=segments).logits)


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_mlm_loss_covers_only_labelled_positions(cfg):
    model = model_for(cfg).train()
    ids, labels = tokens(seed=1), torch.full((2, 10), -100)
    labels[:, [2, 7]] = tokens(seed=2)[:, [2, 7]]
    torch.manual_seed(3)  # dropout is 0, but keep the forward deterministic regardless
    output, logits = model(ids, labels=labels), model(ids).logits
    assert output.logits is None  # with labels only the masked positions reach the head
    assert_close(output.loss, F.cross_entropy(logits[:, [2, 7]].flatten(0, 1), labels[:, [2, 7]].flatten()))
    assert abs(output.loss.item() - math.log(97)) < 0.3
    output.loss.backward()
    assert model.transformer.embed.tokens.weight.grad is not None


def test_decoder_is_tied_and_pad_embedding_starts_at_zero():
    model = model_for(VARIANTS["bert-base-style"])
    assert model.lm_head.weight is model.transformer.embed.tokens.weight
    assert model.transformer.embed.tokens.weight[0].abs().max() == 0
    assert model.lm_head.bias.abs().max() == 0
