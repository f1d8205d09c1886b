"""``nn.RMSNorm``: parameter-free RMS normalisation, then the per-example scale."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.rules._affine import affine
from lightning_dp.rules.base import Rule
from lightning_dp.rules.registry import rules


@rules.register(nn.RMSNorm)
class RMSNormRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.RMSNorm, x: Tensor) -> Tensor:
        xhat = F.rms_norm(x, module.normalized_shape, None, module.eps)
        return affine(site, xhat, module.weight, None)
