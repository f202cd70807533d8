"""Decoder-only causal language model: GPT-2 with learned positions, LayerNorm and GELU, or Llama-style
with rotary positions, RMSNorm, SwiGLU and grouped-query attention, chosen by TransformerConfig."""

import torch
import torch.nn as nn

from models.layers import ModelOutput, Transformer, TransformerConfig, chunked_cross_entropy, init_weights, reduce_loss


class GPT(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        assert config.family == "gpt", f"GPT needs family='gpt', got {config.family!r}"
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One matrix both embeds tokens and scores them (Press & Wolf 2017): saves vocab*d_model params.
            self.lm_head.weight = self.transformer.embed.tokens.weight
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        """input_ids (B, T); labels (B, T) are the next tokens, already aligned by the data loader
        (input_ids = window[:-1], labels = window[1:]), so no shift here; -100 is ignored. Without
        labels: the logits. With labels: the loss ("mean" over the targets, or "sum"), computed chunk by
        chunk from the hidden states, and no logits (see chunked_cross_entropy).

        document_ids (B, T), for documents packed into one window: a token attends only to earlier
        tokens of its own document (block-causal) and positions restart at each document. The
        separator opens a document (as GPT-2's <|endoftext|> does as its BOS), so every target is
        predicted from its own document: the last token of a document predicts the separator, the
        separator predicts the next document's first token. No target is dropped."""
        hidden = self.transformer(input_ids, causal=True, document_ids=document_ids)
        if labels is None:
            return ModelOutput(None, self.lm_head(hidden), hidden)  # logits (B, T, vocab_size)
        summed = chunked_cross_entropy(hidden.flatten(0, 1), self.lm_head, labels.flatten(), self.config.vocab_size)
        return ModelOutput(reduce_loss(summed, labels, loss_reduction), None, hidden)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend prompt_ids (B, T) by up to max_new_tokens sampled tokens; returns (B, T + new).

        temperature 0 is greedy. The context is cropped to the last max_seq_len tokens (no KV cache:
        simple, and fast enough for eval samples). Rows that have emitted eos_token_id keep emitting
        it, and generation stops once every row has."""
        ids = prompt_ids
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_seq_len :]).logits[:, -1, :]  # (B, vocab_size)
            next_ids = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_token_id is not None:
                next_ids = next_ids.masked_fill(finished[:, None], eos_token_id)
                finished |= next_ids[:, 0] == eos_token_id
            ids = torch.cat([ids, next_ids], dim=1)
            if finished.all():
                break
        return ids


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits (B, vocab_size) -> (B, 1): greedy at temperature 0, else
    sample from the softmax of logits / temperature restricted to the top_k tokens and to the
    smallest set whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely tokens before it already reach top_p; the first always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
