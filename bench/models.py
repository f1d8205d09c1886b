"""A small GPT-style decoder for benchmarks, built only from layers every DP engine handles.

Attention is written with ``nn.Linear`` projections and ``F.scaled_dot_product_attention``
rather than ``nn.MultiheadAttention`` (which lightning-dp and Opacus both treat with slower
generic code), and positions use an ``nn.Embedding`` fed ``[B, T]`` ids so that every parametric
layer sees the batch along dimension 0. The LM head is untied from the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    d: int
    layers: int
    heads: int
    seq: int


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d)
        self.pos = nn.Embedding(cfg.seq, cfg.d)
        self.blocks = nn.Sequential(*(Block(cfg.d, cfg.heads) for _ in range(cfg.layers)))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.head = nn.Linear(cfg.d, cfg.vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        # contiguous: Opacus's ghost-norm embedding rule calls .view() on the ids
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        x = self.tok(ids) + self.pos(positions)
        return self.head(self.ln_f(self.blocks(x)))


def per_example_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross-entropy summed over each sequence: shape [B]."""
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(targets.shape).sum(1)
