"""``nn.LayerNorm``: torch's fused normalisation and affine, with per-example clipped
parameters (``_norm_affine``)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_dp.rules._norm_affine import layer_norm
from lightning_dp.rules.base import Rule
from lightning_dp.rules.registry import rules


@rules.register(nn.LayerNorm)
class LayerNormRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.LayerNorm, x: Tensor) -> Tensor:
        return layer_norm(site, x, module.normalized_shape, module.weight, module.bias, module.eps)
