"""Small models covering every per-example rule, with a batch maker and a per-example loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], Tensor]
    fallback: bool = False

    def loss(self, model: nn.Module, x: Tensor) -> Tensor:
        """Sum of per-example losses (a fixed nonlinear readout of every output)."""
        out = model(x)
        return (out.tanh() + 0.5 * out.pow(2)).sum()


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class TiedLM(nn.Module):
    """Embedding, a transformer encoder layer (MHA + MLP + LayerNorm), head tied to the embedding."""

    def __init__(self, vocab: int = 13, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.norm(self.block(self.embed(ids))))


class TinyViT(nn.Module):
    """Bare parameters (class token, position embedding) used in the root's own forward."""

    def __init__(self, patches: int = 4, patch_dim: int = 6, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, d))
        self.patch = nn.Linear(patch_dim, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(h).mean(1))


class Scale(nn.Module):
    """A leaf module with no registered rule: handled by the torch.func fallback."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x * self.gain) + self.shift


def _ids(batch: int, seq: int = 9, vocab: int = 13) -> Tensor:
    ids = torch.randint(0, 5, (batch, seq))  # few distinct ids: repeats within an example
    ids[:, -2:] = 0  # padding tokens
    return ids % vocab


CASES = [
    Case("mlp", lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
         lambda b: torch.randn(b, 6)),
    Case("seq_linear", lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)),
         lambda b: torch.randn(b, 7, 8)),
    Case("embedding", lambda: nn.Sequential(nn.Embedding(13, 6, padding_idx=0), nn.Linear(6, 4)),
         _ids),
    Case("conv1d", lambda: nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv1d(4, 4, 2, dilation=2, groups=2, padding_mode="circular", padding=1),
        Flatten(), nn.LazyLinear(3)),
         lambda b: torch.randn(b, 3, 11)),
    Case("conv2d", lambda: nn.Sequential(
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        nn.Tanh(), nn.Conv2d(6, 3, 3, padding="same", padding_mode="reflect", bias=False),
        nn.InstanceNorm2d(3, affine=True), Flatten(), nn.LazyLinear(2)),
         lambda b: torch.randn(b, 4, 7, 6)),
    Case("conv3d", lambda: nn.Sequential(nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), Flatten()),
         lambda b: torch.randn(b, 2, 3, 4, 3)),
    Case("norms", lambda: nn.Sequential(
        nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 3)),
         lambda b: torch.randn(b, 4, 5)),
    Case("tied_lm", TiedLM, _ids),
    Case("vit", TinyViT, lambda b: torch.randn(b, 4, 6), fallback=True),
    Case("custom_leaf", lambda: nn.Sequential(nn.Linear(4, 6), Scale(6), nn.Linear(6, 2)),
         lambda b: torch.randn(b, 3, 4), fallback=True),
]


def build(case: Case, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """The case's model in float64 (lazy layers materialised) and a batch of 5."""
    torch.manual_seed(seed)
    model = case.build()
    with torch.no_grad():
        model(case.batch(2))  # materialise lazy modules
    return model.double(), case.batch(5).to(torch.float64 if case.batch(1).is_floating_point() else torch.long)


def examples(batch: Tensor) -> list[Tensor]:
    return [batch[i : i + 1] for i in range(batch.shape[0])]


def mixed_loss(out: Tensor) -> Tensor:
    return (out.tanh() + 0.5 * out.pow(2)).sum()


__all__ = ["CASES", "Case", "build", "examples", "F", "mixed_loss"]
