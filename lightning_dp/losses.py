"""Per-example losses for DP training: one loss per example, never a mean over the batch's tokens.

DP-SGD clips each example's gradient, which bounds what one example can change only if that
gradient depends on that example alone. A mean over all the batch's tokens (the default of
``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)``) divides every
example's loss by the number of valid tokens in the *whole* batch, so removing one example
rescales every other example's gradient; the strategies refuse such a loss. The helpers here
reduce within each example and return shape ``[B]``, which ``training_step`` may return as is
(or summed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sequence_cross_entropy"]


def sequence_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Each sequence's mean token cross-entropy over its own valid tokens, shape ``[B]``.

    Example ``i``'s loss is ``sum_t w_it * ce_it / sum_t w_it`` over its tokens whose target is
    not ``ignore_index`` (``w`` the class weight of the target, 1 without ``weight``), so it
    depends on example ``i`` alone and per-example clipping bounds its influence. A sequence
    with no valid token has loss 0 (and no gradient).

    Args:
        logits: ``[B, T, V]`` (or ``[B, *, V]``): classes in the last dimension, as language
            models return them.
        targets: ``[B, T]`` (or ``[B, *]``) class indices, ``ignore_index`` at padding.
        ignore_index: target value of padding tokens, excluded from each sequence's mean.
        weight: optional class weights ``[V]``; each sequence's mean is weighted by them.
        label_smoothing: as in ``F.cross_entropy``.
    """
    if logits.dim() < 2 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"sequence_cross_entropy: logits of shape {tuple(logits.shape)} and targets of shape "
            f"{tuple(targets.shape)} do not match; pass logits [B, T, V] (classes last) and "
            "targets [B, T]."
        )
    batch, per_example = targets.shape[0], math.prod(targets.shape[1:])
    tokens = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), weight=weight,
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none",
    ).view(batch, per_example)  # already weighted by weight[target], 0 at ignored tokens
    valid = (targets != ignore_index).reshape(batch, per_example)
    if weight is None:
        denominator = valid.sum(1).to(tokens.dtype)
    else:
        safe = torch.where(valid, targets.reshape(batch, per_example), 0)
        denominator = (weight.to(tokens.dtype)[safe] * valid).sum(1)
    denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return tokens.sum(1) / denominator
