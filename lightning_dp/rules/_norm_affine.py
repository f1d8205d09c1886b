"""Layer and group normalisation with their affine in one primitive, saving what torch saves.

Normalising first and then applying the affine primitive (``_affine.py``) keeps the normalised
activation ``xhat`` alive from forward to backward: one more activation-sized tensor per norm
layer than non-private training, which saves only the input and the per-row statistics. Here
the forward and the input gradient are torch's own fused kernels, and ``xhat`` is rebuilt from
the input and the statistics in the backward, a few examples at a time, only for the
per-example ``sum_positions(g * xhat)`` of the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dp.rules._affine import AffineUse, affine
from lightning_dp.rules._autocast import no_autocast
from lightning_dp.rules.base import CallSite, rows, trainable


@dataclass(frozen=True)
class NormSpec:
    """``normalized_shape`` (layer norm, trailing dims) or ``groups`` (group norm, dim 1)."""

    eps: float
    normalized_shape: tuple[int, ...] | None = None
    groups: int | None = None

    def forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None):
        if self.groups is None:
            return torch.ops.aten.native_layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        n, c = x.shape[0], x.shape[1]
        return torch.ops.aten.native_group_norm(
            x, weight, bias, n, c, math.prod(x.shape[2:]), self.groups, self.eps)

    def input_grad(self, g: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None) -> Tensor:
        if self.groups is None:
            return torch.ops.aten.native_layer_norm_backward(
                g, x, self.normalized_shape, mean, rstd, weight, None, [True, False, False])[0]
        n, c = x.shape[0], x.shape[1]
        return torch.ops.aten.native_group_norm_backward(
            g, x, mean, rstd, weight, n, c, math.prod(x.shape[2:]), self.groups,
            [True, False, False])[0]

    def normalized(self, x: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
        """``xhat`` of some examples (rows of ``x`` with their statistics)."""
        if self.groups is None:
            return (x - mean).mul_(rstd)  # statistics keep the normalised dims as size 1
        grouped = x.reshape(x.shape[0], self.groups, x.shape[1:].numel() // self.groups)
        return (grouped - mean.unsqueeze(-1)).mul_(rstd.unsqueeze(-1)).view(x.shape)


class _NormAffineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, site, spec: NormSpec, names, x: Tensor, weight: Tensor | None, bias: Tensor | None):
        ctx.site, ctx.spec, ctx.names, ctx.weight, ctx.bias = site, spec, names, weight, bias
        with no_autocast(x.device.type):
            out, mean, rstd = spec.forward(x, weight, bias)
        ctx.save_for_backward(x, mean, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, mean, rstd, weight = ctx.saved_tensors
        spec = ctx.spec
        grad_x = spec.input_grad(g, x, mean, rstd, weight) if ctx.needs_input_grad[3] else None
        params = {n: p for n, p in (("weight", ctx.weight), ("bias", ctx.bias)) if trainable(p)}
        channel_dim = None if spec.groups is None else 1
        xhat = None
        if trainable(ctx.weight):
            def xhat(start: int, stop: int) -> Tensor:
                return spec.normalized(rows(x, start, stop), rows(mean, start, stop), rows(rstd, start, stop))
        use = AffineUse(xhat, g, params, channel_dim)
        use.names.update(ctx.names or {})
        grads = ctx.site.record(use) or {}
        return None, None, None, grad_x, grads.get("weight"), grads.get("bias")


def _fusable(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """torch's fused kernels take one dtype, and autocast on accelerators runs norms in
    float32 (a cast the composite ops make): those cases keep normalise-then-affine."""
    if torch.is_autocast_enabled(x.device.type) and x.device.type != "cpu":
        return False
    return all(p is None or p.dtype == x.dtype for p in (weight, bias))


def layer_norm(
    site: CallSite, x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None,
    bias: Tensor | None, eps: float, names: dict[str, str] | None = None,
) -> Tensor:
    """``F.layer_norm`` with per-example clipped gradients for ``weight`` and ``bias``."""
    shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    if not _fusable(x, weight, bias):
        xhat = torch.nn.functional.layer_norm(x, shape, None, None, eps)
        return affine(site, xhat, weight, bias, names=names)
    return _NormAffineFn.apply(site, NormSpec(eps, normalized_shape=shape), names, site.enter(x), weight, bias)


def group_norm(
    site: CallSite, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
    eps: float, names: dict[str, str] | None = None,
) -> Tensor:
    """``F.group_norm`` with per-example clipped gradients for ``weight`` and ``bias``."""
    if not _fusable(x, weight, bias):
        xhat = torch.nn.functional.group_norm(x, num_groups, None, None, eps)
        return affine(site, xhat, weight, bias, channel_dim=1, names=names)
    return _NormAffineFn.apply(site, NormSpec(eps, groups=num_groups), names, site.enter(x), weight, bias)
