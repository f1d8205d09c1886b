"""The contract between the DP primitives (``rules/``) and the clipping engine (``engine/``).

A primitive (an ``autograd.Function`` for linear, embedding, conv, elementwise affine...) talks
to the engine only through a :class:`CallSite`: in forward it announces a call and has its
input checked against the forward's examples (:meth:`CallSite.enter`); in backward it hands
over a :class:`GradUse`, the factors from which this call's per-example parameter gradients can
be normed and clipped. Both packages import this module and ``rules/`` never imports
``engine/``, so the dependency runs one way: engine -> rules -> protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class TokenFactors:
    """A per-example gradient of shape [p, d] as a sum over tokens of outer products:
    ``G_i = sum_t r_it c_it^T``, with ``cols`` [B, T, d] and ``rows`` either dense [B, T, p] or
    integer ids [B, T] standing for one-hot rows (an embedding's gradient). Two uses of one
    parameter then have ``<G_i, G'_i> = sum_{t,s} <r_it, r'_is> <c_it, c'_is>``: the cross
    term of a tied weight's norm at B*T*T' cost, without instantiating either gradient."""

    rows: Tensor
    cols: Tensor


class GradUse:
    """Per-example gradient factors of one call of a DP primitive.

    ``params`` maps a *role* the primitive knows (``"weight"``, ``"bias"``) to the parameter
    tensor; ``names`` maps each role to the parameter's name in the calling module (they differ
    when a module's own forward calls e.g. ``F.linear(x, self.w_in)``).
    """

    def __init__(self, params: dict[str, Tensor], batch_size: int) -> None:
        self.params = params
        self.batch_size = batch_size
        self.names: dict[str, str] = {role: role for role in params}

    def norm_sq(self, name: str) -> Tensor:
        """Per-example squared L2 norm of parameter ``name``'s gradient, float32, shape [B]."""
        return row_norm_sq(self.per_example(name))

    def norm(self, name: str) -> Tensor:
        """Per-example L2 norm of parameter ``name``'s gradient, float32, shape [B].

        The engine clips from norms. A use that instantiates its per-example gradients gets
        them in one reduction, without the square and the square root around
        :meth:`norm_sq` (two dispatched ops per parameter per step, which add up over the
        hundreds of small modules of a LoRA model); others take the root of :meth:`norm_sq`.
        """
        if type(self).norm_sq is GradUse.norm_sq:
            return row_norm(self.per_example(name))
        return self.norm_sq(name).sqrt()

    def per_example(self, name: str) -> Tensor:
        """Per-example gradients of ``name``, shape [B, *param.shape] (used for shared params)."""
        raise NotImplementedError

    def token_factors(self, name: str) -> TokenFactors | None:
        """``name``'s per-example gradients as :class:`TokenFactors`, where the primitive has
        that form (linear and embedding weights); None: shared uses are instantiated."""
        return None

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        """``sum_i scale[i] * G_i`` for parameter ``name``; rows with scale 0 must add exactly 0,
        even where their factors are not finite."""
        raise NotImplementedError

    def workspace(self) -> tuple[int, int] | None:
        """(temporary, held) elements per example: what norming and clipping one example
        allocates (instantiated gradients, Gram matrices, unfolded patches) and what this call's
        factors already hold. The engine clips a large batch in chunks so that the temporaries
        stay a small share of the held; None: all at once (the factors cannot be split)."""
        return None

    def example_rows(self, start: int, stop: int) -> GradUse:
        """The same call restricted to examples ``start:stop`` (views of its factors)."""
        raise NotImplementedError


class EngineOptions(Protocol):
    """Settings that change speed only (see ``engine.clipper.EngineOptions``)."""

    norm_method: str


class CallSite(Protocol):
    """What a DP primitive needs from the engine for one private module."""

    path: str

    @property
    def options(self) -> EngineOptions: ...

    @property
    def spare_workspace(self) -> int:
        """Elements the running backward has freed so far, which clipping temporaries may use."""
        ...

    def holds_examples(self, rows: int) -> bool:
        """True when an input with ``rows`` leading rows can enter (:meth:`enter` would not
        raise): one row per example of the current forward, or one row for all of them."""
        ...

    def enter(self, x: Tensor, dim: int = 0) -> Tensor:
        """Announce one primitive call whose input ``x`` carries the examples along ``dim``.

        Returns ``x`` when it holds one row per example of the current forward, ``x`` expanded
        to the batch when it holds one row shared by every example (e.g. position ids of shape
        [1, T]), and raises when its rows cannot be mapped to examples.
        """
        ...

    def announce(self) -> None:
        """Announce one call without an input to check (:meth:`enter` announces one too): the
        engine clips a group once it has the one gradient of every call announced for it, and
        refuses a gradient that comes after, so each backward records exactly once."""
        ...

    def record(self, use: GradUse) -> dict[str, Tensor] | None:
        """Hand over one call's gradient factors (eager: None; compiled: the clipped grads)."""
        ...


#: A chunk's temporaries may take this share of its calls' factors (inputs and output
#: gradients, which backpropagation holds in any case)...
WORKSPACE_SHARE = 0.5
#: ...or this many elements, whichever is more: fewer, smaller kernels cost more in overhead.
MIN_WORKSPACE = 2**19


def examples_per_chunk(batch: int, temporary: int, held: int, spare: int = 0) -> int:
    """Examples per chunk, for ``temporary`` and ``held`` elements per example, and ``spare``
    elements known to be free (e.g. released by the layers the backward has passed)."""
    budget = max(WORKSPACE_SHARE * held * batch + spare, MIN_WORKSPACE)
    return max(1, min(batch, int(budget // max(temporary, 1))))


#: Dtypes whose norms and sums accumulate in float32.
_HALF_PRECISION = (torch.float16, torch.bfloat16)


def row_norm(tensor: Tensor) -> Tensor:
    """``||tensor[i]||`` per row of dim 0, at least in float32: one fused reduction, with no
    squared or upcast copy of the (often per-example-gradient-sized) tensor."""
    dims = tuple(range(1, tensor.dim()))
    if tensor.dtype in _HALF_PRECISION:
        return torch.linalg.vector_norm(tensor, dim=dims, dtype=torch.float32)
    return torch.linalg.vector_norm(tensor, dim=dims)  # no dtype= to parse: called per group


def row_norm_sq(tensor: Tensor) -> Tensor:
    """``||tensor[i]||^2`` per row of dim 0 (see :func:`row_norm`)."""
    return row_norm(tensor).square()


def row_dot_(a: Tensor, b: Tensor) -> Tensor:
    """``<a[i], b[i]>`` per row of dim 0; overwrites ``a``, a temporary the caller owns (a Gram
    matrix), with the product. Multiply-then-sum is one vectorised pass each; the batched
    ``[1, n] @ [n, 1]`` product this replaced ran 5-10x slower on CPU (bench/RESULTS.md)."""
    return a.mul_(b).sum(dim=tuple(range(1, a.dim())))


def upcast(tensor: Tensor) -> Tensor:
    """At least float32, for norm accumulation under bf16/fp16 (float64 stays float64)."""
    return tensor.float() if tensor.dtype in _HALF_PRECISION else tensor
