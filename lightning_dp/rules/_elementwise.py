"""``x * v`` and ``x + v`` where ``v`` is a module's own parameter, or an affine image of it
(``1 + w``, ``w.float()``), broadcast over the examples; and such a ``v`` expanded to the batch.

The HF RMSNorm family (``self.weight * h``, Gemma's ``h * (1.0 + self.weight.float())``),
layer-scale vectors and bare biases all end in one such op. Its per-example gradient is the
output gradient (times ``x`` for a product) summed over the dims ``v`` is broadcast along: as
cheap as the norm layers' affine (``_affine.py``), and computed on the module's own op, so the
module keeps its dtype handling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dp.rules.base import CallSite, GradUse, rows, sum_product_per_example, weighted_sum


class ElementwiseUse(GradUse):
    """Per-example gradient of ``param`` where ``v = factor * param + c`` entered ``x op v``."""

    def __init__(self, x: Tensor | None, g: Tensor, param: Tensor, name: str, value_shape: torch.Size, factor: float):
        super().__init__({"param": param}, g.shape[0])
        self.names = {"param": name}
        self.x, self.g, self.factor = x, g, factor
        self.value_shape = (1,) * (g.dim() - len(value_shape)) + tuple(value_shape)
        self._per_example: Tensor | None = None

    def per_example(self, name: str) -> Tensor:
        if self._per_example is None:  # the norm and the clipped sum both read it
            self._per_example = self._compute()
        return self._per_example

    def _reduce(self, t: Tensor) -> Tensor:
        summed = [d for d in range(1, t.dim()) if self.value_shape[d] == 1 and t.shape[d] != 1]
        return t.sum(summed, keepdim=True) if summed else t

    def _compute(self) -> Tensor:
        if self.x is None:
            t = self._reduce(self.g)
        else:
            x = self.x
            t = sum_product_per_example(self.g, lambda start, stop: rows(x, start, stop), self._reduce)
        param = self.params["param"]
        # a float32 op on a float64 parameter (Gemma's norm in double): sum examples in float64
        t = t.reshape(t.shape[0], *param.shape).to(torch.promote_types(t.dtype, param.dtype))
        return t * self.factor if self.factor != 1.0 else t

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        return weighted_sum(scale, self.per_example(name)).to(self.params["param"].dtype)


class _ElementwiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, site, op, name, factor, x: Tensor, value: Tensor, param: Tensor):
        ctx.site, ctx.op, ctx.name, ctx.factor, ctx.param = site, op, name, factor, param
        ctx.x_dtype, ctx.value_shape = x.dtype, value.shape
        ctx.save_for_backward(x if op == "mul" else None, value if op == "mul" else None)
        return x * value if op == "mul" else x + value

    @staticmethod
    def backward(ctx, g: Tensor):
        x, value = ctx.saved_tensors
        grad_x = (g * value if ctx.op == "mul" else g).to(ctx.x_dtype)
        use = ElementwiseUse(x, g, ctx.param, ctx.name, ctx.value_shape, ctx.factor)
        grads = ctx.site.record(use) or {}
        return None, None, None, None, grad_x, None, grads.get("param")


class _BroadcastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, site, name, factor, one_row, expanded: Tensor, param: Tensor):
        ctx.site, ctx.name, ctx.factor, ctx.one_row, ctx.param = site, name, factor, one_row, param
        # a copy: a custom Function's view output could not be changed in place, as the
        # model's own expanded tensor (a view) or repeated one (a copy) can
        return expanded.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        use = ElementwiseUse(None, g, ctx.param, ctx.name, ctx.one_row, ctx.factor)
        grads = ctx.site.record(use) or {}
        return None, None, None, None, None, grads.get("param")


def broadcast(site: CallSite, value: Tensor, param: Tensor, name: str, factor: float, shape: torch.Size) -> Tensor:
    """``value`` (``factor * param + c``, one row) expanded to ``shape``, whose dim 0 holds the
    forward's examples: ViT's ``cls_token.expand(B, -1, -1)``, a Perceiver's latents or a
    pooling head's probe repeated per example. Each example's row is its own copy, whatever
    consumes it (a concatenation, an attention's query), so its gradient is that example's:
    the output gradient summed over the dims ``value`` was broadcast along."""
    one_row = torch.Size((1,) * (len(shape) - value.dim()) + tuple(value.shape))
    expanded = site.enter(value.detach().reshape(one_row).expand(shape))
    return _BroadcastFn.apply(site, name, factor, one_row, expanded, param)


def broadcasts_over_examples(x: Tensor, value: Tensor) -> bool:
    """True when ``value`` broadcasts into ``x`` (the result has ``x``'s shape) without a
    dimension of its own along the examples (dim 0 of ``x``)."""
    if x.dim() == 0 or value.dim() > x.dim():
        return False
    padded = (1,) * (x.dim() - value.dim()) + tuple(value.shape)
    return padded[0] == 1 and all(v in (1, s) for v, s in zip(padded, x.shape))


def elementwise(
    site: CallSite, op: str, x: Tensor, value: Tensor, param: Tensor, name: str, factor: float = 1.0
) -> Tensor:
    """``x * value`` (``op="mul"``) or ``x + value`` (``op="add"``), where ``value`` is
    ``factor * param + c`` in some dtype and shape of the same size, with per-example clipped
    gradients for ``param``. The caller checks :func:`broadcasts_over_examples`."""
    return _ElementwiseFn.apply(site, op, name, factor, site.enter(x), value.detach(), param)
