"""``nn.MultiheadAttention``: the torch.func fallback over all its parameters.

Its forward uses ``out_proj.weight`` functionally (``out_proj``'s own forward never runs), so
the fallback must cover the whole subtree, not only the direct parameters.
"""

from __future__ import annotations

from torch import nn

from lightning_dp.rules.func_fallback import FuncFallbackRule
from lightning_dp.rules.registry import rules


@rules.register(nn.MultiheadAttention)
class MultiheadAttentionRule(FuncFallbackRule):
    def __init__(self) -> None:
        super().__init__(covers_subtree=True)

    def validate(self, module: nn.MultiheadAttention, path: str) -> None:
        if not module.batch_first:
            raise ValueError(
                f"`{path}` is an nn.MultiheadAttention with batch_first=False; lightning-dp needs "
                "the batch dimension first to tell examples apart. Construct it with "
                "batch_first=True and pass [batch, seq, embed] inputs."
            )
