"""Model configuration, the transformer blocks GPT and BERT share, and size arithmetic.

Everything here is plain PyTorch. Positions (sinusoidal, rotary) are computed in forward rather than
stored as buffers, so a model built on the meta device (accelerate.init_empty_weights, a 7B plan) has
nothing left to materialise but its parameters.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    """Shape and flavour of a GPT or BERT model; the pipeline's model section maps onto it 1:1."""

    family: str  # "gpt" (causal LM) | "bert" (masked LM)
    vocab_size: int
    max_seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None = n_heads; fewer = grouped-query attention
    d_ff: int | None = None  # None = derived, see ffn_dim
    activation: str = "gelu"  # "gelu" | "swiglu"
    gelu_approximate: str = "tanh"  # "tanh" (GPT-2's gelu_new) | "none" (BERT's exact erf gelu)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # "pre" | "post" (original Transformer / BERT)
    position: str = "learned"  # "learned" | "sinusoidal" | "rope"
    rope_theta: float = 10000.0
    bias: bool = True  # biases in linear layers and LayerNorms
    tie_embeddings: bool = True
    dropout: float = 0.0
    type_vocab_size: int = 0  # BERT token-type (segment) embeddings; 0 = none
    init_std: float = 0.02
    pad_token_id: int | None = None

    def __post_init__(self):
        # Full validation with helpful messages lives in the pipeline config; these guard the shapes.
        if self.d_model % self.n_heads or self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must divide d_model={self.d_model}, "
                f"and n_kv_heads={self.kv_heads} must divide n_heads"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections (d_model unless grouped-query attention)."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the MLP: d_ff when given, else 4*d_model for GELU, and for SwiGLU
        8*d_model/3 rounded up to a multiple of 64 (three matrices at ~2/3 width keep the parameter
        count of a 4x GELU MLP, as in Llama; the rounding keeps matmuls tile-friendly)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return 64 * math.ceil(int(8 * self.d_model / 3) / 64)
        return 4 * self.d_model


class ModelOutput(NamedTuple):
    loss: torch.Tensor | None  # None when no labels were given
    logits: torch.Tensor | None  # (B, T, vocab_size); None when labels were given (see chunked_cross_entropy)
    hidden: torch.Tensor | None = None  # (B, T, d_model): the final hidden states the head scores


# Each chunk of chunked_cross_entropy holds at most this many logits (256 MiB in fp32): small next to
# a model's activations, large enough for an efficient head matmul.
LOSS_CHUNK_ELEMENTS = 1 << 26


def chunked_cross_entropy(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Summed cross-entropy in fp32 of head(hidden) against labels (-100 ignored), for hidden (N, d) and
    labels (N,), a chunk of rows at a time. Each chunk's logits are recomputed in backward (activation
    checkpointing), so neither the (N, vocab) logits nor their fp32 copy is ever held whole: at gpt2-124m
    with micro-batch 16 x 1024 those are 1.6 GB in bf16 and 3.3 GB in fp32, with as much again for their
    gradient. Equal, up to summation order, to F.cross_entropy(head(hidden).float(), labels, reduction="sum")."""
    from torch.utils.checkpoint import checkpoint

    rows = max(1, LOSS_CHUNK_ELEMENTS // vocab_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        chunk, chunk_labels = hidden[start : start + rows], labels[start : start + rows]
        total = total + checkpoint(_summed_nats, chunk, chunk_labels, head, use_reentrant=False)
    return total


def _summed_nats(hidden: torch.Tensor, labels: torch.Tensor, head) -> torch.Tensor:
    # fp32 log-softmax: in bf16 the small probabilities of a large vocabulary round away.
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=-100, reduction="sum")


def reduce_loss(summed: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """The summed nats as asked: "sum", or "mean" over the scored targets (0 when there are none)."""
    return summed if reduction == "sum" else summed / (labels != -100).sum().clamp(min=1)


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # weight only, as in Llama
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def sinusoidal_positions(seq_len: int, dim: int, device=None) -> torch.Tensor:
    """Vaswani et al.'s table: even features sin(pos / 10000^(i/dim)), odd features cos. (seq_len, dim)"""
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = positions * inv_freq  # (seq_len, dim/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (seq_len, dim/2, 2)
    return table.flatten(1)[:, :dim]


def rope_cos_sin(
    seq_len: int, cfg: TransformerConfig, device=None, positions=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles in Llama's layout: the frequencies repeat over both halves of head_dim, to pair
    with rotate_half. Computed in fp32, as HF does, so bf16 runs rotate by the same angles. (seq_len,
    head_dim) each, or (B, 1, seq_len, head_dim) for per-document `positions` (B, seq_len)."""
    dim = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (seq_len, head_dim)
    if positions is not None:
        angles = angles[positions][:, None]  # (B, 1, seq_len, head_dim): broadcast over heads
    return angles.cos(), angles.sin()


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document (B, T): 0 at every document's first token, so
    positions restart at each document packed into a window."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T): where each token's document began
    return index - start_index


def document_attention_mask(document_ids: torch.Tensor, causal: bool, padding: torch.Tensor | None = None):
    """Who may attend to whom when documents are packed into one window: a token sees only tokens of
    its own document (and, causal, not after itself; with padding (B, T), no padding). On CUDA a
    FlexAttention block mask, whose kernel skips the blocks masked out entirely; elsewhere a dense
    (B, 1, T, T) boolean mask for SDPA."""
    if document_ids.is_cuda and padding is None:
        return flex_block_mask(document_ids, causal)
    T = document_ids.shape[1]
    allowed = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T): same document
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    if padding is not None:
        allowed = allowed & padding.bool()[:, None, :]
    return allowed[:, None]  # (B, 1, T, T): broadcast over heads


def flex_block_mask(document_ids: torch.Tensor, causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(batch, head, query, key):
        allowed = document_ids[batch, query] == document_ids[batch, key]
        return allowed & (query >= key) if causal else allowed

    B, T = document_ids.shape
    return create_block_mask(same_document, B, None, T, T, device=document_ids.device)


_compiled_flex_attention = None


def flex_attention(q, k, v, block_mask):
    """FlexAttention, compiled once per process: uncompiled it runs a slow reference implementation."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention as eager

        _compiled_flex_attention = torch.compile(eager, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) queries or keys; rotate_half pairs feature i with i + head_dim/2."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated_half.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA, with grouped-query attention when kv_heads < n_heads."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        # One fused projection: a single matmul for q, k and v, split afterwards.
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * cfg.kv_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, attn_mask=None, causal=False):
        cfg, (B, T, _) = self.cfg, x.shape
        q, k, v = self.qkv(x).split([cfg.d_model, cfg.kv_dim, cfg.kv_dim], dim=-1)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        v = v.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cfg.kv_heads != cfg.n_heads:
            # Query head i reads kv head i // group (HF's repeat_kv); explicit repeat rather than
            # SDPA's enable_gqa keeps torch 2.4 working.
            group = cfg.n_heads // cfg.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dropout_p = cfg.dropout if self.training else 0.0
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a FlexAttention BlockMask
            y = flex_attention(q, k, v, attn_mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, cfg.d_model)  # (B, T, n_heads * head_dim)
        return self.resid_dropout(self.out(y))


class MLP(nn.Module):
    """GELU MLP (down(gelu(up x))) or SwiGLU (down(silu(gate x) * up x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        if cfg.activation == "swiglu":
            self.gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.cfg.activation == "swiglu":
            hidden = F.silu(self.gate(x)) * self.up(x)
        else:
            hidden = F.gelu(self.up(x), approximate=self.cfg.gelu_approximate)
        return self.dropout(self.down(hidden))


class Block(nn.Module):
    """Attention then MLP, each a residual branch. Pre-norm normalises the branch input (stable
    when deep, GPT-2/Llama); post-norm normalises the sum (original Transformer, BERT)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope=None, attn_mask=None, causal=False):
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), rope, attn_mask, causal)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, rope, attn_mask, causal))
        return self.mlp_norm(x + self.mlp(x))


class Embeddings(nn.Module):
    """Token + position (learned or sinusoidal; rope acts inside attention) + optional token-type
    embeddings. Post-norm models also normalise the sum, as BERT does: every later block input is
    normalised, so the first one is too."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        if cfg.position == "learned":
            self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        if cfg.type_vocab_size:
            self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        if cfg.norm_position == "post":
            self.norm = make_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, token_type_ids=None, positions=None):
        """positions (B, T): each token's position in its document; None: 0..T-1 in every row."""
        cfg, T = self.cfg, input_ids.shape[1]
        assert cfg.max_seq_len >= T, f"sequence of {T} tokens exceeds max_seq_len={cfg.max_seq_len}"
        x = self.tokens(input_ids)  # (B, T, d_model)
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        if cfg.position == "learned":
            x = x + self.positions(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(T, cfg.d_model, input_ids.device)[positions].to(x.dtype)
        if cfg.type_vocab_size:
            x = x + self.token_types(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        if cfg.norm_position == "post":
            x = self.norm(x)
        return self.dropout(x)


class Transformer(nn.Module):
    """Embeddings, the block stack and, for pre-norm, the final norm: input ids -> hidden states."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # Pre-norm leaves the residual stream unnormalised; post-norm blocks already end in a norm.
        if cfg.norm_position == "pre":
            self.final_norm = make_norm(cfg)

    def forward(self, input_ids, token_type_ids=None, causal=False, document_ids=None, padding=None):
        """document_ids (B, T): which packed document each token belongs to (None: one sequence); then
        attention stays within a document and positions restart at each. padding (B, T): 1 = token."""
        positions, attn_mask = None, None
        if document_ids is not None:
            positions = document_positions(document_ids)
            attn_mask, causal = document_attention_mask(document_ids, causal, padding), False
        elif padding is not None:
            attn_mask = padding.bool()[:, None, None, :]  # (B, 1, 1, T): no query attends to padding
        x = self.embed(input_ids, token_type_ids, positions)
        rope = None
        if self.cfg.position == "rope":
            rope = rope_cos_sin(input_ids.shape[1], self.cfg, input_ids.device, positions)
        for block in self.blocks:
            x = block(x, rope, attn_mask, causal)
        return self.final_norm(x) if self.cfg.norm_position == "pre" else x


def init_weights(model: nn.Module, cfg: TransformerConfig) -> None:
    """GPT-2 initialisation: weights N(0, init_std), biases 0, norms 1; the projections that write
    into the residual stream (attention out, MLP down) get std / sqrt(2 * n_layers), so the
    stream's variance does not grow with depth (two residual additions per layer)."""
    # Dispatch on parameter names, not module types: one rule covers LayerNorm, RMSNorm and the MLM bias.
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(param)
        elif param.dim() == 1:
            nn.init.zeros_(param)
        elif name.endswith(("attn.out.weight", "mlp.down.weight")):
            nn.init.normal_(param, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        else:
            nn.init.normal_(param, std=cfg.init_std)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()  # as nn.Embedding itself initialises it


def num_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (a tied lm head counts once); exclude_embeddings drops every nn.Embedding
    table (tokens, learned positions, token types), the convention of Kaplan et al.'s N."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return total


def matmul_parameters(cfg: TransformerConfig) -> int:
    """Weights that take part in a matmul per token: every block's q/k/v/out and MLP matrices, plus
    the output projection to the vocabulary (a matmul whether or not it is tied), plus BERT's MLM
    head transform. Biases and norms are left out: they cost O(1) FLOPs per parameter, not 2."""
    attention = cfg.d_model * (cfg.d_model + 2 * cfg.kv_dim) + cfg.d_model * cfg.d_model  # qkv, out
    mlp = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.ffn_dim
    head_transform = cfg.d_model * cfg.d_model if cfg.family == "bert" else 0
    return cfg.n_layers * (attention + mlp) + head_transform + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B:

        6 * N + 12 * n_layers * d_model * seq_len

    N = matmul_parameters(cfg): non-embedding matmul weights including the projection to the
    vocabulary; each costs 2 FLOPs forward and 4 backward. The second term is attention itself (q.k
    scores and the weighted sum of v, 2 * 2 * seq_len * d_model per layer forward, times 3), counted
    in full although a causal mask lets kernels skip half of it, as PaLM counts it for MFU."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * cfg.d_model * seq_len


def activation_memory_bytes(cfg: TransformerConfig, micro_batch: int, seq_len: int, bytes_per_value: int) -> int:
    """Activations one micro-batch keeps for backward, after Korthikanti et al. 2022 ("Reducing
    Activation Recomputation", no tensor/sequence parallelism, no recomputation).

    Their per-layer s*b*h*(34 + 5*a*s/h) bytes (16-bit values) is generalised to this config: per
    token and layer the stored values are the attention input, q, k, v (k, v narrower under GQA)
    and the attention output; the MLP input and its ffn_dim-wide tensors (GELU: its input and the
    down-projection input; SwiGLU: gate, silu(gate), up and their product); the two norm inputs;
    plus 1-byte dropout masks on both residual branches when dropout > 0. For a GPT-2-shaped layer
    at 2 bytes with dropout this is exactly their 34*s*b*h. The 5*a*s/h term (the s x s attention
    probabilities) is dropped: SDPA's flash / memory-efficient kernels recompute them in backward.
    Added once: the final hidden states entering the lm head and the logits, kept in fp32 by the
    cross-entropy."""
    h, f = cfg.d_model, cfg.ffn_dim
    attention_values = 3 * h + 2 * cfg.kv_dim  # input, q, k, v, output
    mlp_values = h + (4 * f if cfg.activation == "swiglu" else 2 * f)
    norm_values = 2 * h
    dropout_mask_bytes = 2 * h if cfg.dropout > 0 else 0
    per_token_layer = (attention_values + mlp_values + norm_values) * bytes_per_value + dropout_mask_bytes
    per_token_head = h * bytes_per_value + cfg.vocab_size * 4
    return micro_batch * seq_len * (cfg.n_layers * per_token_layer + per_token_head)
