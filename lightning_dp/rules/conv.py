"""``nn.Conv1d/2d/3d``: the linear case on unfolded input patches, per channel group.

With input patches ``U_i`` [L, C_in/groups * prod(k)] (L output positions) and output gradient
``g_i`` [C_out/groups, L] per channel group, ``G_i = g_i U_i``: instantiated, or normed through
the ghost identity over the L x L Gram matrices when that is cheaper. The clipped weight
gradient is one ``convolution_backward`` with scaled output-gradient rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.rules._autocast import cast_for_autocast
from lightning_dp.rules.base import (
    CallSite,
    GradUse,
    Rule,
    row_dot_,
    row_norm,
    rows_kept_by,
    scale_rows,
    trainable,
    upcast,
    weighted_sum,
)
from lightning_dp.rules.norm_method import (
    batch_bucket,
    can_measure,
    choose_norm_method,
    fastest_method,
)
from lightning_dp.rules.registry import rules


def unfold_patches(x: Tensor, conv: ConvSpec) -> Tensor:
    """Input patches [B, C * prod(kernel), L] for a convolution with zero padding, any dims."""
    pad = [p for size in reversed(conv.padding) for p in (size, size)]
    x = F.pad(x, pad)
    n = len(conv.kernel_size)
    for i in range(n):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        x = x.unfold(2 + i, span, conv.stride[i])[..., :: conv.dilation[i]]
    # x: [B, C, L_1..L_n, k_1..k_n] -> [B, C, k_1..k_n, L_1..L_n]
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return x.flatten(2 + n).flatten(1, 1 + n)


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's geometry, with padding already made explicit and symmetric."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


class ConvUse(GradUse):
    def __init__(
        self, x: Tensor, g: Tensor, params: dict[str, Tensor], spec: ConvSpec, weight: Tensor,
        norm_method: str,
    ) -> None:
        batch = g.shape[0]
        super().__init__(params, batch)
        self.x, self.g, self.spec, self.weight_shape = x, g, spec, weight.shape
        self._weight = weight
        groups = spec.groups
        flat = g.flatten(2)  # reshape, not unflatten: dynamo cannot trace Tensor.unflatten
        self.g_grouped = flat.reshape(flat.shape[0], groups, flat.shape[1] // groups, flat.shape[2])  # [B, G, p, L]
        p, positions = self.g_grouped.shape[2], self.g_grouped.shape[3]
        self.patch_len = weight.shape[1] * math.prod(spec.kernel_size)  # d of one channel group
        d = self.patch_len
        if "weight" in params and can_measure(norm_method, batch * groups, positions, p, d):
            key = ("conv", g.device.type, g.dtype, batch_bucket(batch), tuple(x.shape[1:]),
                   tuple(g.shape[1:]), spec)
            workspace = groups * (d * positions + p * d)  # patches and instantiated gradients
            self.method = fastest_method(key, batch, workspace, x.shape[1:].numel() + g.shape[1:].numel(),
                                         lambda method, k: self.example_rows(0, k, method))
        else:
            self.method = choose_norm_method(batch * groups, positions, p, d, norm_method, g.device.type)
        self._instantiated: Tensor | None = None
        self._bias_rows: Tensor | None = None

    def _bias_per_example(self) -> Tensor:
        if self._bias_rows is None:  # read by both the norm and the clipped sum
            self._bias_rows = self.g.flatten(2).sum(2)
        return self._bias_rows

    def _patches(self) -> Tensor:
        u = unfold_patches(self.x, self.spec)  # [B, C_in * K, L]
        groups = self.spec.groups
        return u.reshape(u.shape[0], groups, u.shape[1] // groups, u.shape[2])  # [B, G, d, L]

    def _weight_per_example(self) -> Tensor:
        if self._instantiated is None:
            grads = torch.einsum("bgpl,bgdl->bgpd", self.g_grouped, self._patches())
            self._instantiated = grads.reshape(self.batch_size, *self.weight_shape)
        return self._instantiated

    def norm(self, name: str) -> Tensor:
        if name == "bias":
            return row_norm(self._bias_per_example())
        if self.method == "instantiate":
            return row_norm(self._weight_per_example())
        return self.norm_sq(name).sqrt()

    def norm_sq(self, name: str) -> Tensor:
        if name == "bias" or self.method == "instantiate":
            return self.norm(name).square()
        g, u = upcast(self.g_grouped), upcast(self._patches())
        gram_g = torch.einsum("bgpl,bgpm->bglm", g, g)
        gram_u = torch.einsum("bgdl,bgdm->bglm", u, u)
        return row_dot_(gram_g, gram_u).clamp_(min=0)  # rounding: see linear.ghost_norm_sq

    def per_example(self, name: str) -> Tensor:
        if name == "bias":
            return self._bias_per_example()
        return self._weight_per_example()

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        if name == "bias":
            return weighted_sum(scale, self._bias_per_example())
        if self._instantiated is not None:
            return weighted_sum(scale, self._instantiated)
        spec = self.spec
        _, grad_weight, _ = torch.ops.aten.convolution_backward(  # scaled output-gradient rows
            scale_rows(scale, self.g), rows_kept_by(scale, self.x), self._weight,
            None, spec.stride, spec.padding, spec.dilation, False,
            [0] * len(spec.kernel_size), spec.groups, [False, True, False],
        )
        return grad_weight

    def workspace(self) -> tuple[int, int] | None:
        groups, p, positions = self.g_grouped.shape[1:]
        d = self.patch_len
        patches = groups * d * positions
        if self.method == "instantiate":
            workspace = patches + groups * p * d
        else:
            workspace = patches + 2 * groups * positions * positions + groups * p * positions
        return workspace, self.x.shape[1:].numel() + self.g.shape[1:].numel()

    def example_rows(self, start: int, stop: int, method: str | None = None) -> ConvUse:
        part = ConvUse(
            self.x[start:stop], self.g[start:stop], self.params, self.spec, self._weight,
            method or self.method,
        )
        part.names = self.names
        return part


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, site, spec: ConvSpec, names, x: Tensor, weight: Tensor, bias: Tensor | None):
        ctx.site, ctx.spec, ctx.names, ctx.weight, ctx.bias = site, spec, names, weight, bias
        (xc, wc, bc), autocast_off = cast_for_autocast(x, weight, bias)
        with autocast_off:
            out = torch.ops.aten.convolution(
                xc, wc, bc, spec.stride, spec.padding, spec.dilation, False,
                [0] * len(spec.kernel_size), spec.groups,
            )
        ctx.save_for_backward(xc, wc)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        spec = ctx.spec
        grad_x = None
        if ctx.needs_input_grad[3]:
            grad_x, _, _ = torch.ops.aten.convolution_backward(
                g, x, w, None, spec.stride, spec.padding, spec.dilation, False,
                [0] * len(spec.kernel_size), spec.groups, [True, False, False],
            )
        params = {n: p for n, p in (("weight", ctx.weight), ("bias", ctx.bias)) if trainable(p)}
        use = ConvUse(x, g, params, spec, w, ctx.site.options.norm_method)
        use.names.update(ctx.names or {})
        grads = ctx.site.record(use) or {}
        return None, None, None, grad_x, grads.get("weight"), grads.get("bias")


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


def conv(
    site: CallSite,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    names: dict[str, str] | None = None,
) -> Tensor:
    """``F.conv1d/2d/3d`` (with ``nn.Conv``'s padding modes) whose parameter gradients go to
    ``site``'s clipper, clipped per example."""
    n = weight.dim() - 2
    kernel, dilation = tuple(weight.shape[2:]), _tuple(dilation, n)
    x = site.enter(x)
    if isinstance(padding, str):
        if padding == "valid":
            explicit = (0,) * n
        else:  # "same"
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pad = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
            x = F.pad(x, pad, mode="constant" if padding_mode == "zeros" else padding_mode)
            explicit = (0,) * n
    elif padding_mode != "zeros":
        pad = [p for size in reversed(_tuple(padding, n)) for p in (size, size)]
        x, explicit = F.pad(x, pad, mode=padding_mode), (0,) * n
    else:
        explicit = _tuple(padding, n)
    spec = ConvSpec(kernel, _tuple(stride, n), explicit, dilation, groups)
    return _ConvFn.apply(site, spec, names, x, weight, bias)


@rules.register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
        return conv(
            site, x, module.weight, module.bias, module.stride, module.padding, module.dilation,
            module.groups, module.padding_mode,
        )
