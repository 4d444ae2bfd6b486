"""Llama / Llama-2 decoder (Touvron et al. 2023), shaped so llama-7b/13b/70b match Meta's.

RMSNorm pre-norm blocks, rotary positions, optional grouped-query attention, bias-free SwiGLU
MLP. One deliberate difference from Meta's checkpoints: the output projection is tied to the
token embedding (Llama-2 unties them), so 7B counts 131M fewer parameters than Meta's 6.74B.
Rotary tables are built once per model, not per layer.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.layers import causal_attention, documents, init_normal, merge_heads, split_heads


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    vocab_size: int
    block_size: int  # longest sequence; sizes the rotary tables
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None  # grouped-query attention when < n_head; None means n_head
    ffn_hidden: int | None = None  # None: 2/3 * 4 * n_embd rounded up to ffn_multiple_of
    ffn_multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or self.head_dim % 2:
            raise ValueError(f"n_embd {self.n_embd} / n_head {self.n_head} must be an even int")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        """SwiGLU has three matrices, so 2/3 of the usual 4d keeps the MLP's size (Meta's rule)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        m = self.ffn_multiple_of
        return -(-(8 * self.n_embd // 3) // m) * m


def rope_tables(head_dim: int, block_size: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, each [block_size, head_dim // 2]."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (even, odd) channel pair of x [..., T, D] by its position's angle.

    Same pairing as Meta's view_as_complex, so its checkpoints would line up; written with
    real ops because the traced graph (and the codegen after it) has no complex dtype.
    """
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, spelled out so the trace is plain pow/mean/rsqrt/mul on any device."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Tensor | None) -> Tensor:
        q = apply_rope(split_heads(self.wq(x), self.n_head), cos, sin)
        k = apply_rope(split_heads(self.wk(x), self.n_kv_head), cos, sin)
        v = split_heads(self.wv(x), self.n_kv_head)
        return self.wo(merge_heads(causal_attention(q, k, v, segments)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: Tensor | None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, segments)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """forward(idx [B, T] int64) -> logits [B, T, vocab_size], T <= block_size."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.document_eos: int | None = None  # set: rows are documents packed with this EOS
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(init_normal)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        cos, sin, segments = self.rope_cos[:t], self.rope_sin[:t], None
        if self.document_eos is not None:  # packed documents: rotary positions restart at each
            segments, positions = documents(idx, self.document_eos)
            cos, sin = (F.embedding(positions, table).unsqueeze(1) for table in (cos, sin))
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.lm_head(self.norm_f(x))
