"""Run a module's own ``forward``, with its parametric ops on its own parameters routed to DP
primitives.

A rule owns a parametric *op* (linear, embedding, conv, normalisation affine), not a module
class. A module whose class overrides ``forward`` below a registered class (HF's scaled or
offset embeddings, a user's ``nn.Linear`` subclass), or a custom module that calls
``F.linear``/``F.embedding``/... on its own ``nn.Parameter``, keeps its forward: a scoped
``TorchFunctionMode`` sends those functional calls to the primitives, so training computes the
same function as evaluation. Any other use of the module's own parameter that could carry a
gradient is refused at once, naming the op; with ``fallback=True`` the module is handled by the
torch.func fallback instead.

Elementwise products and sums with a parameter broadcast over the examples (``self.weight * h``
in the HF RMSNorm family, ``h * (1.0 + self.weight.float())`` in Gemma's) are routed too: the
mode follows the parameter through dtype casts, reshapes and scalar affine maps (each result is
``a * w + c``) to the product or sum that uses it.
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
from lightning_dp.rules._elementwise import broadcast, broadcasts_over_examples, elementwise
from lightning_dp.rules._norm_affine import group_norm, layer_norm
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
        if site.compiled:  # a compiled graph cannot switch rules: an unrouted use is refused
            with _RouteOps(site, module):
                return site.original_forward(*args, **kwargs)
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
        self.params = {n: p for n, p in module.named_parameters(recurse=False) if n in site.param_keys}
        #: (tensor, parameter name, a) for tensors computed as ``a * param + c`` in this forward.
        #: Tensors are matched by identity (``is``), never by ``id()``: under dynamo, ``id()``
        #: of a graph input would guard on that very object and recompile at every new batch.
        self.derived: list[tuple[Tensor, str, float]] = []
        #: (tensor, parameter name) for transposes (``w.t()``) of this module's own 2-D
        #: parameters, which ``x @ w.t()`` uses as a linear layer's weight. Not images: their
        #: entries are the parameter's in another layout, which elementwise routes cannot map.
        self.transposes: list[tuple[Tensor, str]] = []

    def owned(self, tensor: Any) -> str | None:
        """The name of this module's own parameter ``tensor`` is, if it is one."""
        for name, param in self.params.items():
            if tensor is param:
                return name
        return None

    def image(self, tensor: Any) -> tuple[str, float] | None:
        """(parameter name, a) when ``tensor`` is a parameter or ``a * parameter + c``."""
        if not isinstance(tensor, Tensor):
            return None
        name = self.owned(tensor)
        if name is not None:
            return name, 1.0
        for derived, name, factor in self.derived:
            if tensor is derived:
                return name, factor
        return None

    def transpose_of(self, tensor: Any) -> str | None:
        """The name of this module's own parameter ``tensor`` is the transpose of, if any."""
        for transposed, name in self.transposes:
            if tensor is transposed:
                return name
        return None

    def names(self, **params: Tensor | None) -> dict[str, str] | None:
        """role -> parameter name when every given tensor is this module's own parameter (or
        None); None when some is another tensor, so that the op is not routed."""
        names = {}
        for role, tensor in params.items():
            if tensor is None:
                continue
            name = self.owned(tensor)
            if name is None:
                return None
            names[role] = name
        return names or None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        route = _ROUTES_BY_NAME[name] if name in _ROUTES_BY_NAME else _ROUTES.get(func)
        if route is not None:
            result = route(self, *args, **kwargs)
            if result is not NotImplemented:
                return result
        result = func(*args, **kwargs)
        self._refuse_unrouted(func, args, kwargs, result)
        return result

    def _refuse_unrouted(self, func: Any, args: tuple, kwargs: dict, result: Any) -> None:
        leaves = tree_flatten((args, kwargs))[0]
        used = [image[0] for image in map(self.image, leaves) if image is not None]
        used += [name for name in map(self.transpose_of, leaves) if name is not None]
        carries_grad = any(
            isinstance(t, Tensor) and t.requires_grad for t in tree_flatten(result)[0]
        )
        if used and carries_grad:
            site, op = self.site, _op_name(func)
            hint = ""
            if op in ("Tensor.T", "Tensor.mT"):
                hint = (f" A linear layer written `x @ self.{used[0]}.T` is routed when written "
                        f"`x @ self.{used[0]}.t()` or `F.linear(x, self.{used[0]})`.")
            raise UnroutedParameterError(
                f"`{site.path}` ({type(site.module).__name__}) uses its parameter "
                f"{used[0]!r} in {op}, which no per-example "
                "rule stands for, so its gradient could not be clipped per example. Pass "
                "fallback=True (the torch.func fallback recomputes the module per example), "
                f"register a rule for the module class, or freeze the parameter.{hint}"
            )


def _linear(mode: _RouteOps, input: Tensor, weight: Tensor, bias: Tensor | None = None):
    names = mode.names(weight=weight, bias=bias)
    if names is None or "weight" not in names:
        return NotImplemented
    return linear(mode.site, input, weight, bias, names=names)


def _transpose(func: Any):
    """A route for ``func`` (``w.t()``, ``w.transpose(0, 1)``, ``torch.t(w)``) on one of the
    module's own 2-D parameters: the result is followed as that parameter's transpose."""

    def route(mode: _RouteOps, tensor: Any, *args: Any, **kwargs: Any):
        name = mode.owned(tensor)
        swaps_the_two_dims = sorted(d % 2 for d in args) in ([], [0, 1])
        if name is None or tensor.dim() != 2 or kwargs or not swaps_the_two_dims:
            return NotImplemented
        result = func(tensor, *args)  # the mode is off inside its own handler
        mode.transposes.append((result, name))
        return result

    return route


def _matmul(mode: _RouteOps, input: Any, other: Any, *args: Any, **kwargs: Any):
    """``x @ w.t()`` (a linear layer written out) or ``x @ w`` (GPT-2 ``Conv1D``'s layout), with
    ``w`` one of the module's own 2-D parameters and ``x`` holding the examples along dim 0: the
    linear primitive. Anything else is left to the refusal (and to ``fallback=True``)."""
    if args or kwargs or not isinstance(input, Tensor) or input.dim() < 2:
        return NotImplemented
    if mode.image(input) is not None or mode.transpose_of(input) is not None:
        return NotImplemented
    if not mode.site.holds_examples(input.shape[0]):
        return NotImplemented
    name = mode.transpose_of(other)
    if name is not None:
        return linear(mode.site, input, mode.params[name], None, names={"weight": name})
    name = mode.owned(other)
    if name is not None and other.dim() == 2:
        return linear(mode.site, input, other, None, transposed=True, names={"weight": name})
    return NotImplemented


def _op_name(func: Any) -> str:
    """``Tensor.T`` for a property's getter, else the function's qualified name."""
    if getattr(func, "__name__", None) == "__get__":
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    return str(getattr(func, "__qualname__", func))


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
    return layer_norm(mode.site, input, normalized_shape, weight, bias, eps, names=names)


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
    return group_norm(mode.site, input, num_groups, weight, bias, eps, names=names)


def _getitem(mode: _RouteOps, tensor: Tensor, index: Any):
    """``self.weight[ids]`` with an integer index tensor is an embedding lookup."""
    names = mode.names(weight=tensor)
    if names is None or not (isinstance(index, Tensor) and not index.is_floating_point()
                             and index.dtype != torch.bool):
        return NotImplemented
    return embedding(mode.site, index, tensor, names=names)


def _derive(func: Any, factor_of: Any):
    """A route for ``func`` mapping a parameter image ``a * w + c`` to another one, whose ``a``
    is multiplied by ``factor_of(*args)`` (None: not such a map)."""

    def route(mode: _RouteOps, tensor: Any, *args: Any, **kwargs: Any):
        image = mode.image(tensor)
        if image is None:
            return NotImplemented
        factor = factor_of(tensor, *args, **kwargs)
        if factor is None:
            return NotImplemented
        result = func(tensor, *args, **kwargs)  # the mode is off inside its own handler
        if isinstance(result, Tensor) and result.numel() == tensor.numel():
            mode.derived.append((result, image[0], image[1] * factor))
        return result

    return route


def _same(tensor: Tensor, *args: Any, **kwargs: Any) -> float | None:
    """Casts and reshapes keep every entry's value: the image's factor is unchanged."""
    return 1.0


def _reshaped(tensor: Tensor, *args: Any, **kwargs: Any) -> float | None:
    """``view(shape)`` keeps the values; ``view(dtype)`` reinterprets the bits."""
    return None if any(isinstance(a, torch.dtype) for a in (*args, *kwargs.values())) else 1.0


def _shift(tensor: Tensor, other: Any = None, *args: Any, alpha: Any = 1, **kwargs: Any) -> float | None:
    return 1.0 if isinstance(other, (int, float)) and not isinstance(other, bool) and alpha == 1 and not args else None


def _negated_shift(tensor: Tensor, other: Any = None, *args: Any, alpha: Any = 1, **kwargs: Any) -> float | None:
    return -1.0 if _shift(tensor, other, *args, alpha=alpha, **kwargs) else None


def _scaled(tensor: Tensor, other: Any = None, *args: Any, **kwargs: Any) -> float | None:
    number = isinstance(other, (int, float)) and not isinstance(other, bool)
    return float(other) if number and not args and not kwargs else None


def _divided(tensor: Tensor, other: Any = None, *args: Any, **kwargs: Any) -> float | None:
    factor = _scaled(tensor, other, *args, **kwargs)
    return None if not factor else 1.0 / factor


def _negated(tensor: Tensor, *args: Any, **kwargs: Any) -> float | None:
    return -1.0 if not args and not kwargs else None


def _binary(func: Any, op: str, scalar_factor: Any):
    """``x * v``/``x + v`` (either order) with ``v`` a parameter image: the elementwise primitive;
    with a Python number instead of ``x``: a new image."""

    def route(mode: _RouteOps, a: Any, b: Any = None, *args: Any, **kwargs: Any):
        if args or kwargs.get("alpha", 1) != 1 or kwargs.get("out") is not None:
            return NotImplemented
        image_a, image_b = mode.image(a), mode.image(b)
        if (image_a is None) == (image_b is None):
            return NotImplemented  # no parameter, or both operands from parameters
        value, x, (name, factor) = (a, b, image_a) if image_a is not None else (b, a, image_b)
        if not isinstance(x, Tensor):
            scale = scalar_factor(value, x)
            if scale is None:
                return NotImplemented
            result = func(a, b)
            mode.derived.append((result, name, factor * scale))
            return result
        if not broadcasts_over_examples(x, value):
            return NotImplemented
        return elementwise(mode.site, op, x, value, mode.params[name], name, factor)

    return route


def _to_examples(mode: _RouteOps, tensor: Tensor, image: tuple[str, float], shape: torch.Size):
    """The parameter image ``tensor``, one row, broadcast to ``shape`` along the examples (dim 0
    the batch, leading dims added as needed): the broadcast primitive; else not followed."""
    one_row = (1,) * (len(shape) - tensor.dim()) + tuple(tensor.shape)
    if one_row[0] != 1 or shape[0] == 1 or not mode.site.holds_examples(shape[0]):
        return NotImplemented  # not a batch expansion: left to the refusal (or the fallback)
    name, factor = image
    return broadcast(mode.site, tensor, mode.params[name], name, factor, shape)


def _expand(mode: _RouteOps, tensor: Any, *sizes: Any, **kwargs: Any):
    """``cls_token.expand(B, -1, -1)`` (ViT's [1, 1, d]), ``class_embedding.expand(B, 1, -1)``
    (CLIP's [d], leading dims added)."""
    image = mode.image(tensor)
    if image is None or kwargs:
        return NotImplemented
    return _to_examples(mode, tensor, image, Tensor.expand(tensor.detach(), *sizes).shape)


def _repeat(mode: _RouteOps, tensor: Any, *repeats: Any, **kwargs: Any):
    """``probe.repeat(B, 1, 1)`` (SigLIP's pooling head): a batch expansion when every dim is
    repeated only where it has size 1, so that tiling and broadcasting agree."""
    image = mode.image(tensor)
    if image is None or kwargs:
        return NotImplemented
    counts = tuple(repeats[0]) if len(repeats) == 1 and isinstance(repeats[0], (tuple, list)) else repeats
    if not all(isinstance(c, (int, torch.SymInt)) for c in counts) or len(counts) < tensor.dim():
        return NotImplemented
    padded = (1,) * (len(counts) - tensor.dim()) + tuple(tensor.shape)
    if any(c != 1 and s != 1 for c, s in zip(counts, padded)):
        return NotImplemented
    return _to_examples(mode, tensor, image, torch.Size(c * s for c, s in zip(counts, padded)))


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
    Tensor.expand: _expand,
    Tensor.repeat: _repeat,
}
_SAME = ("float", "double", "half", "bfloat16", "to", "type_as", "contiguous", "reshape", "unsqueeze",
         "squeeze", "clone")
_ROUTES.update({getattr(Tensor, name): _derive(getattr(Tensor, name), _same) for name in _SAME})
_ROUTES[Tensor.view] = _derive(Tensor.view, _reshaped)
_ROUTES.update({f: _derive(f, _negated) for f in (Tensor.__neg__, Tensor.neg, torch.neg)})
_ROUTES.update({f: _derive(f, _shift) for f in (Tensor.__sub__, Tensor.sub, torch.sub)})
_ROUTES.update({f: _derive(f, _negated_shift) for f in (Tensor.__rsub__, torch.rsub)})
_ROUTES.update({f: _derive(f, _divided) for f in (Tensor.__truediv__, Tensor.div, torch.div)})
_ROUTES.update({f: _binary(f, "mul", _scaled) for f in (Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul)})
_ROUTES.update({f: _binary(f, "add", _shift) for f in (Tensor.__add__, Tensor.__radd__, Tensor.add, torch.add)})
_ROUTES.update({f: _matmul for f in (Tensor.__matmul__, Tensor.matmul, torch.matmul)})
# Not the ``w.T`` property: dynamo does not show property reads to the mode, so a compiled graph
# would see ``x @ w.T`` as a matmul with an unknown tensor and leave its gradient unclipped.
# Refused (eager runs first), it names ``x @ w.t()`` or ``F.linear(x, w)`` as the fix.
_ROUTES.update({f: _transpose(f) for f in (Tensor.t, Tensor.transpose, torch.t, torch.transpose)})
# Tensor methods written in Python (``Tensor.__rsub__``) reach a mode traced by dynamo as the
# function they wrap: find their routes by name too.
_ROUTES_BY_NAME = {"__rsub__": _ROUTES[Tensor.__rsub__]}
