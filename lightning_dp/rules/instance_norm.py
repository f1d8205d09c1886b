"""``nn.InstanceNorm1d/2d/3d`` with ``affine=True``: per-example statistics, per-channel affine.

With ``track_running_stats=True`` the running statistics average over the batch, which leaks
across examples into the model's buffers; the engine's validation refuses that configuration.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.rules._affine import affine
from lightning_dp.rules.base import Rule
from lightning_dp.rules.registry import rules


@rules.register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.modules.instancenorm._InstanceNorm, x: Tensor) -> Tensor:
        xhat = F.instance_norm(x, eps=module.eps)
        return affine(site, xhat, module.weight, module.bias, channel_dim=1)
