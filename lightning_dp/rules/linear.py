"""``nn.Linear`` (and GPT-2's ``Conv1D``): ghost norm or instantiation, chosen by shape.

For ``y = x W^T + b`` with ``x`` [B, T, d] and output gradient ``g`` [B, T, p], example i's
weight gradient is ``G_i = g_i^T x_i``. Its norm comes either from instantiating ``G_i``
(cost B*T*p*d, memory B*p*d) or from the ghost identity ``||G_i||^2 = <g_i g_i^T, x_i x_i^T>``
(cost B*T^2*(p+d), memory B*T^2). The clipped gradient is ``(c * g)^T x``: the output-gradient
rows are scaled and the ordinary weight-gradient matmul runs once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.rules._autocast import cast_for_autocast
from lightning_dp.rules.base import (
    CallSite,
    GradUse,
    Rule,
    TokenFactors,
    as_tokens,
    fresh_output,
    row_dot_,
    row_norm,
    rows_kept_by,
    scale_rows,
    trainable,
    upcast,
    weighted_sum,
)
from lightning_dp.rules.norm_method import (
    NormMethod,
    batch_bucket,
    can_measure,
    choose_norm_method,
    fastest_method,
)
from lightning_dp.rules.registry import rules


def ghost_norm_sq(g: Tensor, x: Tensor) -> Tensor:
    """``||g_i^T x_i||^2`` per example for ``g`` [B, T, p] and ``x`` [B, T, d], from one T x T
    Gram matrix: ``<W W^T, N N^T>`` (W the wider factor, N the narrower) while T is at most N's
    width, else ``<(W W^T) N, N>``, which holds T x width(N) numbers instead of a second T x T
    Gram matrix for the same multiply-adds."""
    narrow, wide = (g, x) if g.shape[2] <= x.shape[2] else (x, g)
    gram = torch.bmm(wide, wide.transpose(1, 2))
    if g.shape[1] <= narrow.shape[2]:
        norm_sq = row_dot_(gram, torch.bmm(narrow, narrow.transpose(1, 2)))
    else:
        norm_sq = row_dot_(torch.bmm(gram, narrow), narrow)
    # a gradient that nearly cancels over tokens can round below 0: its root would be NaN and
    # the example dropped as non-finite
    return norm_sq.clamp_(min=0)


class LinearUse(GradUse):
    """Factors ``x`` [B, T, d] and ``g`` [B, T, p] of one linear call."""

    def __init__(
        self,
        x: Tensor,
        g: Tensor,
        params: dict[str, Tensor],
        *,
        transposed: bool,
        norm_method: NormMethod,
        spare: int = 0,
    ) -> None:
        batch = g.shape[0]
        super().__init__(params, batch)
        self.x = as_tokens(x) if x is not None else None
        self.g = as_tokens(g)
        self.transposed = transposed  # GPT-2 Conv1D stores W as [d, p]
        tokens, p = self.g.shape[1], self.g.shape[2]
        d = self.x.shape[2] if self.x is not None else 0
        if self.x is not None and can_measure(norm_method, batch, tokens, p, d):
            key = ("linear", self.g.device.type, self.g.dtype, batch_bucket(batch), tokens, p, d)
            self.method = fastest_method(key, batch, p * d, tokens * (p + d),
                                         lambda method, k: self.example_rows(0, k, method))
        else:  # compiled graphs clip whole batches, never in chunks
            self.method = choose_norm_method(batch, tokens, p, d, norm_method, self.g.device.type,
                                             None if torch.compiler.is_compiling() else spare)
        self._instantiated: Tensor | None = None
        self._bias_rows: Tensor | None = None
        self._g_norm: Tensor | None = None

    def _bias_per_example(self) -> Tensor:
        if self._bias_rows is None:  # [B, p], used by both the norm and the clipped sum
            self._bias_rows = self.g[:, 0] if self.g.shape[1] == 1 else self.g.sum(1)
        return self._bias_rows

    def _one_token_g_norm(self) -> Tensor:
        """``||g_i||`` of a one-token call: the bias's norm and a factor of the weight's,
        computed once for both."""
        if self._g_norm is None:
            self._g_norm = row_norm(self._bias_per_example())
        return self._g_norm

    def _weight_per_example(self) -> Tensor:
        if self._instantiated is None:
            self._instantiated = torch.bmm(self.g.transpose(1, 2), self.x)  # [B, p, d]
        return self._instantiated

    def _ghost(self, name: str) -> bool:
        return name != "bias" and self.method != "instantiate" and self.g.shape[1] > 1

    def norm(self, name: str) -> Tensor:
        if self._ghost(name):
            return self.norm_sq(name).sqrt()
        one_token = self.g.shape[1] == 1
        if name == "bias":
            return self._one_token_g_norm() if one_token else row_norm(self._bias_per_example())
        if self.method == "instantiate":
            return row_norm(self._weight_per_example())
        return self._one_token_g_norm() * row_norm(self.x)

    def norm_sq(self, name: str) -> Tensor:
        if self._ghost(name):
            return ghost_norm_sq(upcast(self.g), upcast(self.x))
        return self.norm(name).square()

    def per_example(self, name: str) -> Tensor:
        if name == "bias":
            return self._bias_per_example()
        grads = self._weight_per_example()
        return grads.transpose(1, 2) if self.transposed else grads

    def token_factors(self, name: str) -> TokenFactors | None:
        if name == "bias":
            return None
        g, x = upcast(self.g), upcast(self.x)
        return TokenFactors(rows=x, cols=g) if self.transposed else TokenFactors(rows=g, cols=x)

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        if name == "bias":
            return weighted_sum(scale, self._bias_per_example())
        if self._instantiated is not None:
            grad = weighted_sum(scale, self._instantiated)
        else:  # (c * g)^T x = g^T (c * x): the scaled copy is of the narrower factor
            g, x = self.g, self.x
            if g.shape[2] <= x.shape[2]:
                g, x = scale_rows(scale, g), rows_kept_by(scale, x)
            else:
                g, x = rows_kept_by(scale, g), scale_rows(scale, x)
            grad = g.flatten(0, 1).t().mm(x.flatten(0, 1))
        return grad.t() if self.transposed else grad

    def workspace(self) -> tuple[int, int] | None:
        if self.x is None:
            return None  # a bias alone: B*p numbers, nothing to bound
        tokens, p, d = self.g.shape[1], self.g.shape[2], self.x.shape[2]
        if self.method == "instantiate":
            workspace = p * d
        else:  # one Gram matrix, the second or its product with a factor, the scaled factor
            narrow = min(p, d)
            gram = tokens * (tokens + min(tokens, narrow)) if tokens > 1 else 0
            workspace = gram + tokens * narrow
        return workspace, tokens * (p + d)

    def example_rows(self, start: int, stop: int, method: str | None = None) -> LinearUse:
        part = LinearUse(
            self.x[start:stop], self.g[start:stop], self.params,
            transposed=self.transposed, norm_method=method or self.method,
        )
        part.names = self.names
        return part


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, site, transposed: bool, names, x: Tensor, weight: Tensor, bias: Tensor | None):
        ctx.site, ctx.transposed, ctx.names = site, transposed, names
        ctx.weight, ctx.bias = weight, bias
        (xc, wc, bc), autocast_off = cast_for_autocast(x, weight, bias)
        with autocast_off:
            out = F.linear(xc, wc.t() if transposed else wc, bc)
        ctx.save_for_backward(xc if trainable(weight) else None, wc)
        return fresh_output(out)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[3]:
            grad_x = g.matmul(w.t() if ctx.transposed else w)
        params = {n: p for n, p in (("weight", ctx.weight), ("bias", ctx.bias)) if trainable(p)}
        site = ctx.site
        use = LinearUse(x, g, params, transposed=ctx.transposed, norm_method=site.options.norm_method,
                        spare=site.spare_workspace)
        use.names.update(ctx.names or {})
        grads = site.record(use) or {}
        return None, None, None, grad_x, grads.get("weight"), grads.get("bias")


def linear(
    site: CallSite,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    transposed: bool = False,
    names: dict[str, str] | None = None,
) -> Tensor:
    """``F.linear`` whose parameter gradients go to ``site``'s clipper, clipped per example.

    ``names`` maps ``"weight"``/``"bias"`` to the parameters' names in the calling module when
    they differ (a module's own forward calling ``F.linear`` on its parameters).
    """
    return _LinearFn.apply(site, transposed, names, site.enter(x), weight, bias)


@rules.register(nn.Linear)
class LinearRule(Rule):
    handles = ("weight", "bias")

    def forward(self, site, module: nn.Linear, x: Tensor) -> Tensor:
        return linear(site, x, module.weight, module.bias)
