"""Refuse layers that mix examples within a batch, before anything runs.

DP-SGD bounds each example's influence by clipping its own gradient. A layer whose output for
example i depends on example j (batch statistics) breaks that bound however well gradients are
clipped, and running statistics leak batch information into the model's buffers.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


def check_no_cross_example_layers(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first module that mixes examples, and the fix."""
    for path, module in model.named_modules():
        name = path or "(root)"
        kind = type(module).__name__
        if isinstance(module, _BatchNorm):
            raise ValueError(
                f"`{name}` is a {kind}, which normalises with statistics over the whole batch and "
                "so mixes examples, breaking per-example privacy; replace it with GroupNorm or "
                "LayerNorm (e.g. nn.GroupNorm(min(32, C), C))."
            )
        if isinstance(module, _InstanceNorm) and module.track_running_stats:
            raise ValueError(
                f"`{name}` is a {kind} with track_running_stats=True, whose running statistics "
                "average over the batch and leak it into the model's buffers; construct it with "
                "track_running_stats=False."
            )
