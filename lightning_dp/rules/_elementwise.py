"""``x * v`` and ``x + v`` where ``v`` is a module's own parameter, or an affine image of it
(``1 + w``, ``w.float()``), broadcast over the examples.

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


class _ConcatFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, site, dim, spec, *tensors: Tensor):
        parts, params = tensors[: len(spec)], tensors[len(spec):]
        ctx.site, ctx.dim, ctx.spec, ctx.params = site, dim, spec, params
        ctx.sizes = [part.shape[dim] for part in parts]
        ctx.dtypes = [part.dtype for part in parts]
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, g: Tensor):
        grads_in: list[Tensor | None] = []
        grads_param: list[Tensor | None] = [None] * len(ctx.params)
        for part, (g_part, entry) in enumerate(zip(g.split(ctx.sizes, ctx.dim), ctx.spec)):
            if entry is None:
                grads_in.append(g_part.to(ctx.dtypes[part]))
                continue
            index, name, base_shape, factor = entry
            use = ElementwiseUse(None, g_part, ctx.params[index], name, base_shape, factor)
            grads_param[index] = (ctx.site.record(use) or {}).get("param")
            grads_in.append(None)
        return (None, None, None, *grads_in, *grads_param)


def concat(site: CallSite, parts: list[Tensor], dim: int, images: list[tuple[Tensor, str, torch.Size, float] | None]) -> Tensor:
    """``torch.cat(parts, dim)`` where some parts are a parameter (times ``factor``) expanded
    from ``base_shape`` (one row) to the batch, e.g. ViT's class token; the others hold the
    examples. Each such parameter's per-example gradient is its slice of the output gradient,
    summed over the dims it was broadcast along."""
    examples = next(i for i, image in enumerate(images) if image is None)
    parts = list(parts)
    parts[examples] = site.enter(parts[examples])
    # the backward hands over one gradient per parameter image (DeiT's class and distillation
    # tokens are two) and ``enter`` announced one
    site.announce(calls=sum(image is not None for image in images) - 1)
    params, spec = [], []
    for part, image in zip(parts, images):
        if image is None:
            spec.append(None)
            continue
        param, name, base_shape, factor = image
        spec.append((len(params), name, base_shape, factor))
        params.append(param)
    values = [part if image is None else part.detach() for part, image in zip(parts, images)]
    return _ConcatFn.apply(site, dim, tuple(spec), *values, *params)


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
