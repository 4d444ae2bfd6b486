"""GPT-2 decoder (Radford et al. 2019), shaped so gpt2-small has the real 124M parameters.

Pre-LayerNorm blocks, learned absolute positions, fused qkv projection with bias, tanh-GELU
MLP, lm_head tied to the token embedding. No dropout: the model is traced into a static
graph and forward must be a pure function of (parameters, idx).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.layers import causal_attention, documents, init_normal, merge_heads, split_heads


@dataclass(frozen=True, kw_only=True)
class GPT2Config:
    vocab_size: int
    block_size: int  # longest sequence; sizes the position table
    n_layer: int
    n_head: int
    n_embd: int
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor, segments: Tensor | None) -> Tensor:
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(causal_attention(q, k, v, segments)))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, segments: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), segments)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """forward(idx [B, T] int64) -> logits [B, T, vocab_size], T <= block_size."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.empty(cfg.block_size, cfg.n_embd))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.document_eos: int | None = None  # set: rows are documents packed with this EOS

        self.apply(init_normal)
        nn.init.normal_(self.pos_emb, std=0.02)
        # GPT-2 paper: residual-stream writes scaled so the stream's variance stays O(1) in depth.
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, std=residual_std)

    def forward(self, idx: Tensor) -> Tensor:
        if self.document_eos is None:
            segments, pos = None, self.pos_emb[: idx.shape[1]]
        else:  # packed documents: attention and positions restart at each
            segments, positions = documents(idx, self.document_eos)
            pos = F.embedding(positions, self.pos_emb)
        x = self.tok_emb(idx) + pos
        for block in self.blocks:
            x = block(x, segments)
        return self.lm_head(self.norm_f(x))
