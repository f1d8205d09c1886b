"""What a per-example gradient rule is, and tensor helpers the primitives share.

A *rule* computes one module type's forward through DP primitives (``autograd.Function``s).
A primitive's backward returns the input gradient as usual, and hands the engine a
:class:`~lightning_dp.rules.protocol.GradUse`: the factors from which this call's per-example
parameter gradients can be normed and clipped (for a linear layer, the output gradient ``g``
and input ``x``). The primitive returns ``None`` for parameters, so their ``.grad`` is written
only by the engine, after clipping.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dp.rules.protocol import (
    CallSite,
    GradUse,
    TokenFactors,
    examples_per_chunk,
    row_dot_,
    row_norm,
    row_norm_sq,
    upcast,
)

__all__ = [
    "CallSite", "GradUse", "Rule", "TokenFactors", "as_tokens", "fresh_output", "in_dtype",
    "row_dot_", "row_norm", "row_norm_sq", "rows", "rows_kept_by", "scale_rows", "settle_factors_",
    "sum_product_per_example", "trainable", "upcast", "weighted_sum",
]


class Rule:
    """How one module type computes its forward so that per-example clipping is possible."""

    #: True when the rule handles every parameter under the module (e.g. a module that uses its
    #: children's parameters functionally, as ``nn.MultiheadAttention`` does with ``out_proj``).
    covers_subtree: bool = False
    #: Direct parameter names the rule's primitive handles; None means all of them.
    handles: tuple[str, ...] | None = None

    def param_names(self, module: nn.Module) -> list[str]:
        """Names (relative to ``module``) of the trainable parameters this rule handles."""
        params = module.named_parameters(recurse=self.covers_subtree)
        return [n for n, p in params if p.requires_grad and (self.handles is None or n in self.handles)]

    def compilable(self, module: nn.Module) -> bool:
        """False when the rule keeps per-call state in Python (the torch.func fallback), which
        ``lightning_dp.compile`` refuses."""
        return True

    def validate(self, module: nn.Module, path: str) -> None:
        """Raise if this module's configuration cannot be made private (e.g. mixes examples)."""

    def forward(self, site: CallSite, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The module's forward, routed through the rule's DP primitive."""
        raise NotImplementedError


def as_tokens(tensor: Tensor) -> Tensor:
    """[B, ..., d] -> [B, T, d] (T = 1 for [B, d]), without ``-1`` so that B = 0 works."""
    if tensor.dim() == 3:
        return tensor
    return tensor.unsqueeze(1) if tensor.dim() == 2 else tensor.flatten(1, -2)


def rows(tensor: Tensor, start: int, stop: int) -> Tensor:
    """``tensor[start:stop]``, or ``tensor`` itself when that is all of it: a slice is one more
    dispatched call per clipped module, and the whole batch is the common case."""
    return tensor if start == 0 and stop == tensor.shape[0] else tensor[start:stop]


def sum_product_per_example(
    a: Tensor, b_rows: Callable[[int, int], Tensor], reduce: Callable[[Tensor], Tensor]
) -> Tensor:
    """``reduce(a * b)`` where ``b_rows(start, stop)`` gives rows of ``b`` (same shape as
    ``a``), made a few examples at a time: a per-example reduction of an activation-sized
    product never holds the whole product (nor, when ``b`` is rebuilt per chunk, all of ``b``)."""
    batch = a.shape[0]
    per_example = a.shape[1:].numel()
    chunk = examples_per_chunk(batch, 2 * per_example, 2 * per_example)
    if chunk >= batch:  # the common case; also a batch of 0
        return reduce(a * b_rows(0, batch))
    return torch.cat([reduce(a[i : i + chunk] * b_rows(i, min(i + chunk, batch)))
                      for i in range(0, batch, chunk)])


def trainable(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad


def _host_knows(tensor: Tensor) -> bool:
    """Reading ``tensor``'s values is free: on the host, outside compiled graphs. On
    accelerators it would be a device synchronisation, which costs more than the passes it saves."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


class _KeptRows:
    """Whether no clip factor of a tensor is 0, for the last factors seen: every parameter of a
    group is clipped with the same factors, so this is found out once per group, not per use
    (and by the clipper itself where it has just read the factors)."""

    def __init__(self) -> None:
        self._last: tuple[weakref.ref, bool] | None = None

    def __call__(self, scale: Tensor) -> bool:
        if self._last is not None and self._last[0]() is scale:
            return self._last[1]
        kept = _host_knows(scale) and bool(scale.all())  # nonzero entries are True
        self.remember(scale, kept)
        return kept

    def remember(self, scale: Tensor, kept: bool) -> None:
        if not torch.compiler.is_compiling():
            self._last = (weakref.ref(scale), kept)


_kept_rows = _KeptRows()


def settle_factors_(factors: Tensor) -> Tensor:
    """Clip factors made safe for clipped sums: a NaN factor (from a NaN norm) becomes 0.

    On the host one read of the smallest factor says whether any row is dropped (0 or NaN; the
    clip functions return no infinite factor); when none is, the factors are returned as they
    are and the clipped sums skip their zeroing pass. Elsewhere the NaN pass always runs.
    """
    if _host_knows(factors) and (factors.numel() == 0 or factors.min().item() > 0):
        _kept_rows.remember(factors, True)
        return factors
    factors.nan_to_num_(nan=0.0, posinf=0.0)
    _kept_rows.remember(factors, False)
    return factors


def rows_kept_by(scale: Tensor, tensor: Tensor) -> Tensor:
    """``tensor`` ready for a clipped sum: where some clip factor is 0, its non-finite entries
    are zeroed. A row whose factor is not 0 has a finite norm, which every entry of the
    tensors it was computed from reaches, so only rows of factor 0 change, and those are then
    multiplied by 0. On the host, when no factor is 0, the pass is skipped; on accelerators it
    is one op (a mask, a select and a scalar were four)."""
    return tensor if _kept_rows(scale) else tensor.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def fresh_output(out: Tensor) -> Tensor:
    """``out`` as a tensor autograd does not count as a view, for a primitive to return.

    A custom Function's output that is a view cannot be modified in place (``h = layer(x);
    h += r``, as Falcon's MLP does), which a plain module's output can. ``F.linear`` with a bias
    on a [B, T, d] input returns a view of the product it made inside the primitive: nothing
    else holds that product, so dropping the view relation hides no aliasing. Compiled graphs
    trace the Function, views and in-place ops included, and need none of this."""
    if torch.compiler.is_compiling() or not out._is_view():
        return out
    return out.detach()  # a tensor with no view relation (a third of ``_unsafe_view``'s cost)


def in_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without a dispatched call when it already is: this runs a few
    times per clipping group, where each torch call costs 5-15 us (bench/RESULTS.md)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def scale_rows(scale: Tensor, tensor: Tensor) -> Tensor:
    """``scale[i] * tensor[i]``, with rows of scale 0 exactly zero even if they hold NaN/inf."""
    shape = (-1,) + (1,) * (tensor.dim() - 1)
    return rows_kept_by(scale, tensor * in_dtype(scale, tensor.dtype).view(shape))


def weighted_sum(scale: Tensor, tensor: Tensor) -> Tensor:
    """``sum_i scale[i] * tensor[i]`` as one matrix-vector product (no scaled copy of
    ``tensor``); rows of scale 0 add exactly zero even if they hold NaN/inf."""
    kept = rows_kept_by(scale, tensor)
    if kept.dim() != 2:
        kept = kept.reshape(kept.shape[0], tensor.shape[1:].numel())
    summed = torch.mv(kept.t(), in_dtype(scale, tensor.dtype))  # two ops fewer than ``scale @``
    return summed if tensor.dim() == 2 else summed.view(tensor.shape[1:])
