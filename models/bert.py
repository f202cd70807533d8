"""Bidirectional encoder with a masked-language-model head (BERT). BERT-base itself is post-norm with
an embedding LayerNorm, learned positions, two token types and exact (erf) GELU; TransformerConfig also
allows the pre-norm, RMSNorm, rotary and SwiGLU variants."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import ModelOutput, Transformer, TransformerConfig, init_weights, make_norm


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
    ) -> ModelOutput:
        """input_ids, attention_mask (1 = token, 0 = padding), labels (-100 = not masked, ignored),
        token_type_ids and document_ids are all (B, T). With document_ids (documents packed into one
        window, each ending with its [SEP]) a token attends only to its own document, and positions
        restart at each document."""
        hidden = self.transformer(input_ids, token_type_ids, document_ids=document_ids, padding=attention_mask)
        hidden = F.gelu(self.mlm_transform(hidden), approximate=self.config.gelu_approximate)
        logits = self.lm_head(self.mlm_norm(hidden))  # (B, T, vocab_size)
        loss = None
        if labels is not None:
            # fp32 log-softmax: in bf16 the small probabilities of a large vocabulary round away.
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return ModelOutput(loss, logits)
