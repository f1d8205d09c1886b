"""Run a module's own ``forward``, with its parametric ops on its own parameters routed to DP
primitives.

A rule owns a parametric *op* (linear, embedding, conv, normalisation affine), not a module
class. A module whose class overrides ``forward`` below a registered class (HF's scaled or
offset embeddings, a user's ``nn.Linear`` subclass), or a custom module that calls
``F.linear``/``F.embedding``/... on its own ``nn.Parameter``, keeps its forward: a scoped
``TorchFunctionMode`` sends those functional calls to the primitives, so training computes the
same function as evaluation. Any other use of the module's own parameter that could carry a
gradient (``self.weight * x``, ``self.weight[ids]``) is refused at once, naming the op; with
``fallback=True`` the module is handled by the torch.func fallback instead.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lightning_dp.rules._affine import affine
from lightning_dp.rules.base import CallSite, Rule
from lightning_dp.rules.conv import conv
from lightning_dp.rules.embedding import EmbeddingOptions, embedding
from lightning_dp.rules.func_fallback import FuncFallbackRule
from lightning_dp.rules.linear import linear


class UnroutedParameterError(ValueError):
    """A module's own parameter was used by an op no DP primitive stands for."""


class RoutedRule(Rule):
    """A module's own forward with its direct parameters' functional ops routed to primitives.

    Args:
        fallback: on the first call whose forward uses a parameter in an op that cannot be
            routed, switch this module to the torch.func fallback instead of refusing it.
    """

    def __init__(self, fallback: bool = False) -> None:
        self.fallback = fallback

    def forward(self, site: Any, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        pending = dict(site.clipper._pending)
        try:
            with _RouteOps(site, module):
                return site.original_forward(*args, **kwargs)
        except UnroutedParameterError:
            if not self.fallback:
                raise
        # The aborted forward's calls never reach a backward: forget them, then recompute.
        site.clipper._pending.clear()
        site.clipper._pending.update(pending)
        if any(p.requires_grad for c in module.children() for p in c.parameters()):
            warnings.warn(
                f"`{site.path}` ({type(module).__name__}) uses its own parameters "
                f"{sorted(site.param_keys)} in ops no rule stands for; the torch.func fallback "
                "re-runs its whole forward per example in the backward pass. Move them into a "
                "small leaf module to avoid the cost.",
                stacklevel=2,
            )
        site.rule = FuncFallbackRule()
        return site.rule.forward(site, module, *args, **kwargs)


class _RouteOps(TorchFunctionMode):
    def __init__(self, site: CallSite, module: nn.Module) -> None:
        super().__init__()
        self.site = site
        self.owned = {
            id(p): n for n, p in module.named_parameters(recurse=False) if n in site.param_keys
        }

    def names(self, **params: Tensor | None) -> dict[str, str] | None:
        """role -> parameter name when every given tensor is this module's own parameter (or
        None); None when some is another tensor, so that the op is not routed."""
        names = {}
        for role, tensor in params.items():
            if tensor is None:
                continue
            if id(tensor) not in self.owned:
                return None
            names[role] = self.owned[id(tensor)]
        return names or None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None:
            result = route(self, *args, **kwargs)
            if result is not NotImplemented:
                return result
        result = func(*args, **kwargs)
        self._refuse_unrouted(func, args, kwargs, result)
        return result

    def _refuse_unrouted(self, func: Any, args: tuple, kwargs: dict, result: Any) -> None:
        used = [
            self.owned[id(t)] for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor) and id(t) in self.owned
        ]
        carries_grad = any(
            isinstance(t, Tensor) and t.requires_grad for t in tree_flatten(result)[0]
        )
        if used and carries_grad:
            site = self.site
            raise UnroutedParameterError(
                f"`{site.path}` ({type(site.module).__name__}) uses its parameter "
                f"{used[0]!r} in {getattr(func, '__qualname__', func)!s}, which no per-example "
                "rule stands for, so its gradient could not be clipped per example. Pass "
                "fallback=True (the torch.func fallback recomputes the module per example), "
                "register a rule for the module class, or freeze the parameter."
            )


def _linear(mode: _RouteOps, input: Tensor, weight: Tensor, bias: Tensor | None = None):
    names = mode.names(weight=weight, bias=bias)
    if names is None or "weight" not in names:
        return NotImplemented
    return linear(mode.site, input, weight, bias, names=names)


def _embedding(
    mode: _RouteOps, input: Tensor, weight: Tensor, padding_idx: int | None = None,
    max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
    sparse: bool = False,
):
    names = mode.names(weight=weight)
    if names is None:
        return NotImplemented
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    options = EmbeddingOptions(padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    return embedding(mode.site, input, weight, options, names=names)


def _conv(
    mode: _RouteOps, input: Tensor, weight: Tensor, bias: Tensor | None = None,
    stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
):
    names = mode.names(weight=weight, bias=bias)
    if names is None or "weight" not in names:
        return NotImplemented
    return conv(mode.site, input, weight, bias, stride, padding, dilation, groups, names=names)


def _layer_norm(
    mode: _RouteOps, input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5,
):
    names = mode.names(weight=weight, bias=bias)
    if names is None:
        return NotImplemented
    xhat = F.layer_norm(input, normalized_shape, None, None, eps)
    return affine(mode.site, xhat, weight, bias, names=names)


def _rms_norm(
    mode: _RouteOps, input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
    eps: float | None = None,
):
    names = mode.names(weight=weight)
    if names is None:
        return NotImplemented
    xhat = F.rms_norm(input, normalized_shape, None, eps)
    return affine(mode.site, xhat, weight, None, names=names)


def _group_norm(
    mode: _RouteOps, input: Tensor, num_groups: int, weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5,
):
    names = mode.names(weight=weight, bias=bias)
    if names is None:
        return NotImplemented
    xhat = F.group_norm(input, num_groups, None, None, eps)
    return affine(mode.site, xhat, weight, bias, channel_dim=1, names=names)


def _getitem(mode: _RouteOps, tensor: Tensor, index: Any):
    """``self.weight[ids]`` with an integer index tensor is an embedding lookup."""
    names = mode.names(weight=tensor)
    if names is None or not (isinstance(index, Tensor) and not index.is_floating_point()
                             and index.dtype != torch.bool):
        return NotImplemented
    return embedding(mode.site, index, tensor, names=names)


_ROUTES = {
    Tensor.__getitem__: _getitem,
    F.linear: _linear,
    F.embedding: _embedding,
    torch.conv1d: _conv,
    torch.conv2d: _conv,
    torch.conv3d: _conv,
    F.layer_norm: _layer_norm,
    F.rms_norm: _rms_norm,
    F.group_norm: _group_norm,
}
