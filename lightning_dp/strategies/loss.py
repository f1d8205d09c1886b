"""Turn what ``training_step`` returned into the sum of per-example losses.

The engine clips per-example gradients of a *summed* loss. A loss averaged over the batch
shrinks every per-example gradient by 1/B: clipping stops biting and the signal drowns in
noise. ``training_step`` may return per-example losses (shape [B]), their sum, or their mean;
a scalar's reduction is read from the autograd graph where it can be.

A scalar loss must be a plain sum or a plain mean over the batch's examples. A mean whose
denominator is counted from the batch (``ignore_index`` tokens, class weights, ``mask.sum()``)
makes every example's gradient depend on the other examples, so clipping no longer bounds what
one example changes; such losses are refused (:func:`data_dependent_denominator`), pointing at
per-example losses such as :func:`lightning_dp.losses.sequence_cross_entropy`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossReduction = Literal["auto", "sum", "mean"]

# aten's Reduction enum as saved on loss backward nodes: 0 none, 1 mean, 2 sum.
_SAVED_REDUCTION = {1: "mean", 2: "sum"}
# Nodes of the loss's scalar head visited at most (a loss is a handful of scalar ops).
_MAX_HEAD_NODES = 256

PER_EXAMPLE_FIX = (
    "Return one loss per example instead (shape [B]), reduced within each example: for padded "
    "sequences `lightning_dp.losses.sequence_cross_entropy(logits, targets, ignore_index=-100)` "
    "(each sequence's mean over its own tokens), otherwise `F.cross_entropy(..., "
    "reduction='none')` (or a masked sum) reduced over each example's own tokens."
)


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


def data_dependent_denominator(loss: Tensor, batch_size: int) -> str | None:
    """What in the scalar loss divides by a count taken from the batch, or None.

    Walks the loss's scalar head (the 0-dim nodes of its autograd graph, down to the
    reductions) and reads the saved attributes of: ``nll_loss``/``cross_entropy`` means (class
    weights; targets equal to ``ignore_index``), divisions by a tensor that is neither 1 nor the
    batch size (``loss.sum() / mask.sum()``), and means over mask-selected elements
    (``losses[mask].mean()``). A divisor's provenance is not in the graph, so a constant
    tensor divisor other than 1 or the batch size is refused too.
    """
    root = loss.grad_fn
    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack and len(seen) < _MAX_HEAD_NODES:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        reason = _denominator_of(node, batch_size)
        if reason is not None:
            return reason
        for parent, index in node.next_functions:
            if parent is not None and _is_scalar_output(parent, index):
                stack.append(parent)
    return None


def _is_scalar_output(node: object, index: int) -> bool:
    metadata = getattr(node, "_input_metadata", None)  # shapes of the node's forward outputs
    if metadata is None or index >= len(metadata):
        return False
    return len(metadata[index].shape) == 0


def _denominator_of(node: object, batch_size: int) -> str | None:
    name = type(node).__name__
    if name.startswith("NllLoss") and getattr(node, "_saved_reduction", None) == 1:
        weight, target = node._saved_weight, node._saved_target
        ignore_index = int(node._saved_ignore_index)
        if ignore_index >= 2**63:  # saved as an unsigned 64-bit value
            ignore_index -= 2**64
        if weight is not None and not bool((weight == 1).all()):
            return (
                "F.cross_entropy/nll_loss with reduction='mean' and a class `weight` divides by "
                f"the summed weights of the batch's targets ({float(node._saved_total_weight):g})"
            )
        ignored = int((target == ignore_index).sum())
        if ignored:
            return (
                f"F.cross_entropy/nll_loss with reduction='mean' and ignore_index={ignore_index} "
                f"divides by the number of valid targets in the whole batch ({ignored} of "
                f"{target.numel()} targets are ignored here)"
            )
    elif name.startswith("DivBackward") and len(node.next_functions) > 1 and node.next_functions[1][0] is None:
        divisor = getattr(node, "_saved_other", None)
        if isinstance(divisor, Tensor) and divisor.numel() == 1:
            divisor = divisor.item()
        if isinstance(divisor, (int, float)) and divisor not in (1, batch_size):
            return (
                f"it is divided by {divisor!r}, which is neither 1 nor the batch size "
                f"{batch_size} (a mean like `loss.sum() / mask.sum()` divides by a count of the "
                "whole batch)"
            )
    elif name.startswith("MeanBackward") and node.next_functions:
        parent = node.next_functions[0][0]
        parent_name = type(parent).__name__
        masked = parent_name.startswith("MaskedSelectBackward") or (
            parent_name.startswith("IndexBackward")
            and any(isinstance(i, Tensor) and i.dtype == torch.bool for i in parent._saved_indices)
        )
        if masked:
            return "it is a mean over elements selected by a mask (`losses[mask].mean()`)"
    return None


def summed_loss(loss: Tensor, batch_size: int, reduction: LossReduction) -> Tensor:
    """The sum over examples of the per-example losses that ``loss`` represents."""
    if loss is None:
        raise TypeError(
            "training_step returned None, which Lightning reads as 'skip this batch'. Under "
            "lightning-dp a batch cannot be skipped: it was drawn by Poisson sampling, which the "
            "privacy accounting counts on, and each step releases its (noisy) update. Return the "
            "loss for every batch; to leave examples out, give them loss 0 (multiply their "
            "per-example losses by a 0/1 mask that depends on each example alone)."
        )
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
    denominator = data_dependent_denominator(loss, batch_size)
    if denominator is not None:
        raise ValueError(
            f"training_step's loss is not a plain sum or mean over the batch's examples: "
            f"{denominator}. Each example's gradient then depends on the other examples in the "
            "batch, so per-example clipping no longer bounds what one example changes (removing "
            "one example can move the clipped sum by more than the clipping threshold) and the "
            f"privacy guarantee does not hold. {PER_EXAMPLE_FIX}"
        )
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
