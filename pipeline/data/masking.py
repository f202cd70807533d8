"""Masking of a packed window: BERT's masked-LM corruption (80/10/10) and the document ids that
document-aware attention and per-document positions use."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # label of unmasked positions, skipped by torch's cross-entropy


def mlm_mask(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    probability: float,
    mask_token_id: int,
    special_ids: np.ndarray,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one sample: (inputs, labels), labels IGNORE_INDEX except at chosen positions."""
    chosen = (rng.random(tokens.shape) < probability) & ~np.isin(tokens, special_ids)
    action = rng.random(tokens.shape)
    random_tokens = rng.integers(0, vocab_size, size=tokens.shape)
    inputs = tokens.copy()
    inputs[chosen & (action < 0.8)] = mask_token_id
    replaced = chosen & (action >= 0.8) & (action < 0.9)
    inputs[replaced] = random_tokens[replaced]
    labels = np.where(chosen, tokens, IGNORE_INDEX)
    return inputs, labels


def document_ids(tokens: np.ndarray, separator_id: int, family: str) -> np.ndarray:
    """(B, T) index of the packed document each token belongs to, counting from 0 in each row. The
    shards append the separator after every document; GPT's separator opens the next document (its
    BOS: GPT-2's <|endoftext|>), BERT's closes its own (its [SEP])."""
    is_separator = tokens == separator_id
    counted = np.cumsum(is_separator, axis=1)
    return counted if family == "gpt" else counted - is_separator
