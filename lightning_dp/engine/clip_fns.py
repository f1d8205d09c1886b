"""Per-example clip factors: the scale applied to an example's group gradient given its norm.

Each is a few in-place ops on one fresh tensor (this runs once per group per backward). A clip
function maps an infinite norm to factor 0 and a NaN norm to NaN, which the clipper zeroes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

ClipFn = Literal["abadi", "automatic"]

# Keeps C / (norm + tiny) finite at norm 0 and the clipped norm strictly below C.
_TINY = 1e-6


def abadi(norms: Tensor, threshold: float, gamma: float) -> Tensor:
    """Hard clipping (Abadi et al. 2016): ``min(1, C / ||g||)``; clipped norm <= C."""
    return (norms + _TINY).reciprocal_().mul_(threshold).clamp_(max=1.0)


def automatic(norms: Tensor, threshold: float, gamma: float) -> Tensor:
    """Automatic/normalised clipping (Bu et al. 2022, AUTO-S): ``C / (||g|| + gamma)``.

    Every example is rescaled to norm just below C, so the sensitivity is still C per group and
    C itself only rescales the update (it acts as a learning-rate factor).
    """
    return (norms + gamma).reciprocal_().mul_(threshold)


CLIP_FNS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "abadi": abadi,
    "automatic": automatic,
}
