"""``nn.GroupNorm``: per-example statistics, so it is DP-safe; parameters are per channel."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_dp.rules._norm_affine import group_norm
from lightning_dp.rules.base import Rule
from lightning_dp.rules.registry import rules


@rules.register(nn.GroupNorm)
class GroupNormRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.GroupNorm, x: Tensor) -> Tensor:
        return group_norm(site, x, module.num_groups, module.weight, module.bias, module.eps)
