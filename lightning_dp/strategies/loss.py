"""Turn what ``training_step`` returned into the sum of per-example losses.

The engine clips per-example gradients of a *summed* loss. A loss averaged over the batch
shrinks every per-example gradient by 1/B: clipping stops biting and the signal drowns in
noise. ``training_step`` may return per-example losses (shape [B]), their sum, or their mean;
a scalar's reduction is read from the autograd graph where it can be.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossReduction = Literal["auto", "sum", "mean"]

# aten's Reduction enum as saved on loss backward nodes: 0 none, 1 mean, 2 sum.
_SAVED_REDUCTION = {1: "mean", 2: "sum"}


def detected_reduction(loss: Tensor) -> str | None:
    """'mean' or 'sum' when the scalar loss's last op says so, else None."""
    node = loss.grad_fn
    if node is None:
        return None
    name = type(node).__name__
    if name.startswith("MeanBackward"):
        return "mean"
    if name.startswith("SumBackward"):
        return "sum"
    saved = getattr(node, "_saved_reduction", None)
    return _SAVED_REDUCTION.get(saved)


def summed_loss(loss: Tensor, batch_size: int, reduction: LossReduction) -> Tensor:
    """The sum over examples of the per-example losses that ``loss`` represents."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"training_step returned {type(loss).__name__}; lightning-dp needs a loss tensor "
            "(or a dict with a 'loss' tensor)."
        )
    if loss.dim() >= 1:
        if loss.shape[0] != batch_size:
            raise ValueError(
                f"training_step returned a loss of shape {tuple(loss.shape)} for a batch of "
                f"{batch_size}; return per-example losses of shape [{batch_size}] "
                "(reduction='none'), their sum, or their mean."
            )
        return loss.sum()
    detected = detected_reduction(loss)
    if reduction == "auto":
        if detected is None:
            raise ValueError(
                "lightning-dp cannot tell whether training_step's scalar loss is a sum or a mean "
                f"over the batch (its last op is {type(loss.grad_fn).__name__}). Return "
                "per-example losses (reduction='none'), or set the strategy's loss_reduction to "
                "'sum' or 'mean'."
            )
        reduction = detected
    elif detected is not None and detected != reduction:
        raise ValueError(
            f"The strategy has loss_reduction={reduction!r} but training_step's loss is a "
            f"{detected} over the batch ({type(loss.grad_fn).__name__}). A mean treated as a sum "
            "shrinks per-example gradients by 1/B (clipping stops working); a sum treated as a "
            "mean inflates them. Set loss_reduction to 'auto' or "
            f"{detected!r}, or return per-example losses."
        )
    return loss * batch_size if reduction == "mean" else loss


def empty_loss(device: torch.device) -> Tensor:
    """A loss for an empty logical batch: differentiable, touching no parameter."""
    return torch.zeros((), device=device, requires_grad=True)
