"""``nn.LayerNorm``: parameter-free normalisation, then the per-example affine primitive."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.rules._affine import affine
from lightning_dp.rules.base import Rule
from lightning_dp.rules.registry import rules


@rules.register(nn.LayerNorm)
class LayerNormRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.LayerNorm, x: Tensor) -> Tensor:
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return affine(site, xhat, module.weight, module.bias)
