"""``nn.GroupNorm``: per-example statistics, so it is DP-safe; parameters are per channel."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.rules._affine import affine
from lightning_dp.rules.base import Rule
from lightning_dp.rules.registry import rules


@rules.register(nn.GroupNorm)
class GroupNormRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.GroupNorm, x: Tensor) -> Tensor:
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
        return affine(site, xhat, module.weight, module.bias, channel_dim=1)
