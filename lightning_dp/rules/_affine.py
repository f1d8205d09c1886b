"""The elementwise affine ``y = xhat * w + b`` that follows every normalisation layer.

Normalisation layers are split into the parameter-free normalisation (ordinary autograd) and
this primitive, whose per-example gradients are cheap to instantiate: ``w`` has only d entries,
so ``G_i = sum over positions of g_i * xhat_i`` is B*d numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dp.rules.base import (
    CallSite,
    GradUse,
    rows,
    sum_product_per_example,
    trainable,
    weighted_sum,
)


class AffineUse(GradUse):
    """``xhat_rows(start, stop)``: the normalised input of those examples (saved, or rebuilt
    from the statistics by ``_norm_affine``); None when the weight is not trained."""

    def __init__(
        self, xhat_rows: Callable[[int, int], Tensor] | None, g: Tensor, params: dict[str, Tensor],
        channel_dim: int | None,
    ):
        super().__init__(params, g.shape[0])
        self.xhat_rows, self.g, self.channel_dim = xhat_rows, g, channel_dim
        self.shape = next(iter(params.values())).shape
        self._per_example: dict[str, Tensor] = {}  # the norm and the clipped sum both read it

    def _reduce(self, t: Tensor) -> Tensor:
        """Sum a [B, ...] tensor down to the per-example parameter shape [B, *param.shape]."""
        if self.channel_dim is None:  # parameter spans the trailing dims (LayerNorm, RMSNorm)
            leading = t.dim() - len(self.shape)
            return t.flatten(1, leading - 1).sum(1) if leading > 1 else t
        return t.flatten(2).sum(2) if t.dim() > 2 else t  # per channel (GroupNorm)

    def per_example(self, name: str) -> Tensor:
        if name not in self._per_example:
            self._per_example[name] = (
                self._reduce(self.g) if name == "bias"
                else sum_product_per_example(self.g, self.xhat_rows, self._reduce)
            )
        return self._per_example[name]

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        return weighted_sum(scale, self.per_example(name))


def _broadcast(param: Tensor, like: Tensor, channel_dim: int | None) -> Tensor:
    if channel_dim is None:
        return param
    return param.view(-1, *([1] * (like.dim() - 2)))


class _AffineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, site, channel_dim, names, xhat: Tensor, weight: Tensor | None, bias: Tensor | None):
        ctx.site, ctx.channel_dim, ctx.names, ctx.weight, ctx.bias = site, channel_dim, names, weight, bias
        out = xhat
        if weight is not None:
            out = out * _broadcast(weight, xhat, channel_dim)
        if bias is not None:
            out = out + _broadcast(bias, xhat, channel_dim)
        ctx.save_for_backward(xhat if trainable(weight) else None)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (xhat,) = ctx.saved_tensors
        weight = ctx.weight
        grad_xhat = g if weight is None else g * _broadcast(weight, g, ctx.channel_dim)
        params = {n: p for n, p in (("weight", weight), ("bias", ctx.bias)) if trainable(p)}
        rows_of_xhat = None if xhat is None else (lambda start, stop: rows(xhat, start, stop))
        use = AffineUse(rows_of_xhat, g, params, ctx.channel_dim)
        use.names.update(ctx.names or {})
        grads = ctx.site.record(use) or {}
        return None, None, None, grad_xhat, grads.get("weight"), grads.get("bias")


def affine(
    site: CallSite,
    xhat: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    channel_dim: int | None = None,
    names: dict[str, str] | None = None,
) -> Tensor:
    """``xhat * weight + bias`` with per-example clipped parameter gradients.

    ``channel_dim=None`` broadcasts the parameters over trailing dims; ``1`` over channels.
    """
    return _AffineFn.apply(site, channel_dim, names, site.enter(xhat), weight, bias)
