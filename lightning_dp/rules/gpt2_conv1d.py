"""transformers' GPT-2 ``Conv1D``: a linear layer that stores W as [in, out].

Registered by name, so transformers is imported only by models that use it.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_dp.rules.base import Rule
from lightning_dp.rules.linear import linear
from lightning_dp.rules.registry import rules


@rules.register("transformers.pytorch_utils.Conv1D")
class GPT2Conv1DRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.Module, x: Tensor) -> Tensor:
        return linear(site, x, module.weight, module.bias, transposed=True)
