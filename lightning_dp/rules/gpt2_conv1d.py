"""transformers' GPT-2 ``Conv1D`` (a linear layer storing W as [in, out]), when installed."""

from __future__ import annotations

from torch import Tensor

from lightning_dp.rules.base import Rule
from lightning_dp.rules.linear import linear
from lightning_dp.rules.registry import rules

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional
    Conv1D = None

if Conv1D is not None:

    @rules.register(Conv1D)
    class GPT2Conv1DRule(Rule):
        handles = ("weight", "bias")

        def forward(self, site, module: Conv1D, x: Tensor) -> Tensor:
            return linear(site, x, module.weight, module.bias, transposed=True)
