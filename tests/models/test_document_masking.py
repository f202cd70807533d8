"""Document masking for packed windows: a token attends only to its own document, positions restart.

Windows hold several documents back to back. GPT's separator opens a document (its BOS), BERT's closes
one (its [SEP]); the document ids below follow those conventions, as the loader computes them
(pipeline.data.masking.document_ids).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from models import BERT, GPT, TransformerConfig
from models.layers import document_attention_mask, document_positions, flex_block_mask

SEP = 1
GPT_TINY = dict(family="gpt", vocab_size=97, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
BERT_TINY = dict(family="bert", vocab_size=97, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
VARIANTS = {
    "gpt2": TransformerConfig(**GPT_TINY),
    "llama-rope-gqa": TransformerConfig(
        **GPT_TINY, n_kv_heads=2, activation="swiglu", norm="rmsnorm", position="rope", bias=False
    ),
    "gpt-sinusoidal": TransformerConfig(**GPT_TINY, position="sinusoidal"),
    "bert-base-style": TransformerConfig(**BERT_TINY, norm_position="post", gelu_approximate="none"),
    "bert-rope": TransformerConfig(**BERT_TINY, position="rope", norm="rmsnorm"),
}


def build(cfg: TransformerConfig):
    torch.manual_seed(0)
    return (GPT if cfg.family == "gpt" else BERT)(cfg).eval()


def docs_of(ids: torch.Tensor, family: str) -> torch.Tensor:
    is_sep = (ids == SEP).long()
    counted = is_sep.cumsum(dim=1)
    return counted if family == "gpt" else counted - is_sep


def window(*documents: list[int]) -> torch.Tensor:
    """Documents packed as the shards hold them: each followed by the separator (GPT: the separator
    then opens the next document)."""
    tokens = [t for document in documents for t in [*document, SEP]]
    return torch.tensor([tokens])


def test_positions_restart_at_each_document():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [3, 3, 3, 3, 3, 3, 3, 3]])
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_changing_a_token_of_one_document_changes_no_logit_of_another(cfg):
    model = build(cfg)
    ids = window([5, 6, 7, 8], [9, 10, 11], [12, 13])  # (1, 12)
    docs = docs_of(ids, cfg.family)
    changed = ids.clone()
    changed[0, 1] = 50  # a token of the first document
    before, after = model(ids, document_ids=docs).logits, model(changed, document_ids=docs).logits
    others = docs[0] != docs[0, 1]
    assert_close(before[0, others], after[0, others], rtol=0, atol=1e-6)
    assert not torch.allclose(before[0, ~others], after[0, ~others])
    unmasked = model(changed).logits  # without document masking the change leaks into later documents
    assert not torch.allclose(before[0, others], unmasked[0, others])


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_a_window_of_one_document_gives_the_unmasked_logits(cfg):
    model = build(cfg)
    ids = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    one_document = torch.zeros_like(ids)
    assert_close(model(ids, document_ids=one_document).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_a_later_document_gets_the_logits_it_gets_at_the_start_of_a_window(cfg):
    model = build(cfg)
    first, later = [5, 6, 7, 8, 9], [20, 21, 22, 23]
    packed = window(first, later)  # (1, 11)
    alone = window(later, [30, 31, 32, 33, 34])
    if cfg.family == "gpt":  # the separator before `later` opens it: put it first in the window
        alone = torch.cat([torch.tensor([[SEP]]), alone[:, :-1]], dim=1)
    start = len(first) if cfg.family == "gpt" else len(first) + 1
    span = len(later) + 1  # GPT: separator + document; BERT: document + its [SEP]
    packed_logits = model(packed, document_ids=docs_of(packed, cfg.family)).logits[0, start : start + span]
    alone_logits = model(alone, document_ids=docs_of(alone, cfg.family)).logits[0, :span]
    assert_close(packed_logits, alone_logits, rtol=1e-5, atol=1e-5)


def test_gpt_loss_keeps_every_target_including_the_separator():
    """The choice stated in GPT.forward: no position is dropped from the loss; a document's last
    token predicts the separator, the separator predicts the next document's first token."""
    cfg = VARIANTS["gpt2"]
    model = build(cfg)
    packed = window([5, 6, 7], [8, 9, 10])
    inputs, labels = packed[:, :-1], packed[:, 1:]
    output = model(inputs, labels=labels, document_ids=docs_of(inputs, "gpt"))
    expected = F.cross_entropy(model(inputs, document_ids=docs_of(inputs, "gpt")).logits[0], labels[0])
    assert_close(output.loss, expected)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [True, False])
def test_flex_block_mask_matches_the_dense_mask(causal):
    """The CUDA path (FlexAttention with a block mask) against the dense SDPA mask, run eagerly on the
    CPU: the same mask function decides both."""
    from torch.nn.attention.flex_attention import flex_attention

    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2] * 16, [0] * 128])
    q, k, v = torch.randn(3, 2, 2, 128, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    block_mask = flex_block_mask(docs, causal)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=document_attention_mask(docs, causal))
    assert_close(flex_attention(q, k, v, block_mask=block_mask), dense, rtol=1e-5, atol=1e-5)
