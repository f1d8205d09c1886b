"""Benchmark models (a GPT-style decoder, a ViT-style encoder, a GroupNorm CNN), built only from
layers every DP engine handles.

Attention is written with ``nn.Linear`` projections and ``F.scaled_dot_product_attention``
rather than ``nn.MultiheadAttention`` (which lightning-dp and Opacus both treat with slower
generic code), and positions use an ``nn.Embedding`` fed ``[B, T]`` ids so that every parametric
layer sees the batch along dimension 0. The LM head is untied from the token embedding. The ViT
pools by averaging instead of a class token (a bare ``nn.Parameter`` that needs a fallback), and
the CNN normalises with GroupNorm (BatchNorm mixes examples and is refused).
"""

from __future__ import annotations

import itertools
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
    def __init__(self, d: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, causal)
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


@dataclass(frozen=True)
class ViTConfig:
    image: int
    patch: int
    d: int
    layers: int
    heads: int
    classes: int


class ViT(nn.Module):
    """Patch embedding (a strided conv), learned positions, pre-norm blocks, mean pooling."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patches = (cfg.image // cfg.patch) ** 2
        self.embed = nn.Conv2d(3, cfg.d, cfg.patch, stride=cfg.patch)
        self.pos = nn.Embedding(self.patches, cfg.d)
        self.blocks = nn.Sequential(*(Block(cfg.d, cfg.heads, causal=False) for _ in range(cfg.layers)))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.head = nn.Linear(cfg.d, cfg.classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)  # [B, patches, d]
        positions = torch.arange(self.patches, device=images.device).expand(x.shape[0], -1).contiguous()
        x = self.blocks(x + self.pos(positions))
        return self.head(self.ln_f(x).mean(1))


@dataclass(frozen=True)
class CNNConfig:
    image: int
    width: int
    classes: int


class CNN(nn.Module):
    """Three conv-GroupNorm-ReLU stages with pooling, then a linear classifier."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        widths = (3, cfg.width, 2 * cfg.width, 4 * cfg.width)
        stages = []
        for c_in, c_out in itertools.pairwise(widths):
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*stages)
        self.head = nn.Linear(widths[-1] * (cfg.image // 8) ** 2, cfg.classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).flatten(1))


def per_example_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of each example, token losses summed over a sequence: shape [B]."""
    losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
    return losses.view(targets.shape[0], -1).sum(1)
