"""Bidirectional encoder with a masked-language-model head (BERT). BERT-base itself is post-norm with
an embedding LayerNorm, learned positions, two token types and exact (erf) GELU; TransformerConfig also
allows the pre-norm, RMSNorm, rotary and SwiGLU variants."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import (
    ModelOutput,
    Transformer,
    TransformerConfig,
    chunked_cross_entropy,
    init_weights,
    make_norm,
    reduce_loss,
)


class BERT(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        assert config.family == "bert", f"BERT needs family='bert', got {config.family!r}"
        self.config = config
        self.transformer = Transformer(config)
        # MLM head: a dense + GELU + norm transform, then scores against the vocabulary with a bias.
        self.mlm_transform = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.mlm_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.embed.tokens.weight
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        """input_ids, attention_mask (1 = token, 0 = padding; None: no padding), labels (-100 = not
        masked, ignored), token_type_ids and document_ids are all (B, T). With document_ids (documents
        packed into one window, each ending with its [SEP]) a token attends only to its own document,
        and positions restart at each document. Without labels: the logits of every position. With
        labels: the loss ("mean" over the masked positions, or "sum") and no logits; only the masked
        positions (~15%) go through the MLM head, chunk by chunk (see chunked_cross_entropy)."""
        hidden = self.transformer(input_ids, token_type_ids, document_ids=document_ids, padding=attention_mask)
        if labels is None:
            return ModelOutput(None, self.mlm_logits(hidden), hidden)  # (B, T, vocab_size)
        # The masked positions' count is data: on a GPU, finding them waits for the device once.
        scored = (labels.flatten() != -100).nonzero().squeeze(1)  # (N,)
        picked = hidden.flatten(0, 1).index_select(0, scored)  # (N, d_model)
        summed = chunked_cross_entropy(picked, self.mlm_logits, labels.flatten()[scored], self.config.vocab_size)
        return ModelOutput(reduce_loss(summed, labels, loss_reduction), None, hidden)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head: (..., d_model) -> (..., vocab_size)."""
        hidden = F.gelu(self.mlm_transform(hidden), approximate=self.config.gelu_approximate)
        return self.lm_head(self.mlm_norm(hidden))
