"""The ``torch.func`` fallback: per-example gradients by ``vmap`` of a per-example VJP.

For a module without a dedicated rule (or a bare ``nn.Parameter`` used in a module's own
forward, such as a class token or position embedding), the forward runs as usual with its
direct parameters passed through an identity *tap*, and its outputs through another tap that
records their gradient. When the parameter tap's backward runs, every output gradient is known,
so the module's forward is re-run per example under ``vmap`` and differentiated with
``torch.func.vjp`` with respect to those parameters only. The per-example gradients are
instantiated (B copies of the parameters), which is cheap for the small parameters this is
meant for. Cost: one extra forward and backward of the module; children with rules of their
own run plain in that recomputation. Randomness (dropout) in the recomputation is drawn afresh
per example: privacy is unaffected, the recomputed gradient just uses another mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_dp.rules.base import GradUse, Rule, weighted_sum


class FallbackUse(GradUse):
    def __init__(self, params: dict[str, Tensor], grads: dict[str, Tensor], batch_size: int):
        super().__init__(params, batch_size)
        self.grads = grads

    def per_example(self, name: str) -> Tensor:
        return self.grads[name]

    def clipped_grad(self, name: str, scale: Tensor) -> Tensor:
        return weighted_sum(scale, self.grads[name])


class _Call:
    """One call of a fallback module: its inputs, output gradients, and how to recompute."""

    def __init__(self, site, names: list[str], args: tuple, kwargs: dict, vectorized: bool) -> None:
        self.site, self.names, self.vectorized = site, names, vectorized
        self.inputs, self.input_spec = tree_flatten((args, kwargs))
        self.inputs = [t.detach() if isinstance(t, Tensor) else t for t in self.inputs]
        #: per input leaf: the dim that indexes examples, or None for inputs every example shares
        self.input_dims: list[int | None] = [None] * len(self.inputs)
        self.batch_size = 0
        self.output_grads: tuple[Tensor, ...] | None = None
        self.output_positions: list[int] = []
        #: per tapped output: the dim that indexes examples
        self.output_dims: list[int] = []

    def per_example_grads(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        site = self.site
        if self.batch_size == 0:  # vmap cannot map over an empty dimension
            return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        tensors = [t for t, d in zip(self.inputs, self.input_dims) if d is not None]
        dims = [d for d in self.input_dims if d is not None]

        def one_example(example_tensors: list[Tensor], output_grads: tuple[Tensor, ...]):
            it = iter(example_tensors)
            leaves = [
                t if d is None else next(it).unsqueeze(d) for t, d in zip(self.inputs, self.input_dims)
            ]
            args, kwargs = tree_unflatten(leaves, self.input_spec)

            def forward(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
                out = functional_call(site.module, p, args, kwargs, strict=False)
                leaves = tree_flatten(out)[0]
                return tuple(
                    leaves[i].squeeze(d) for i, d in zip(self.output_positions, self.output_dims)
                )

            _, pullback = vjp(forward, params)
            return pullback(output_grads)[0]

        with site.clipper.disabled(), torch.enable_grad(), _named_on_error(site):
            if self.vectorized:
                return vmap(one_example, in_dims=(dims, tuple(self.output_dims)), randomness="different")(
                    tensors, self.output_grads
                )
            per_example = [
                one_example(
                    [t.select(d, i) for t, d in zip(tensors, dims)],
                    tuple(g.select(d, i) for g, d in zip(self.output_grads, self.output_dims)),
                )
                for i in range(self.batch_size)
            ]
            return {n: torch.stack([grads[n] for grads in per_example]) for n in params}


@contextlib.contextmanager
def _named_on_error(site) -> Iterator[None]:
    """An error of the per-example recomputation, raised from inside torch.func in the
    backward, names the module it recomputed and what to do."""
    try:
        yield
    except RuntimeError as error:
        if hasattr(error, "add_note"):  # 3.11+
            error.add_note(
                f"lightning-dp: raised while the torch.func fallback recomputed `{site.path}` "
                f"({type(site.module).__name__}) per example. Code torch.func cannot transform "
                "(e.g. an autograd.Function without setup_context, as in peft's LoHa) cannot be "
                "clipped this way: freeze that module's parameters, or register a rule for it."
            )
        raise


class _ParamTap(torch.autograd.Function):
    """Identity on the module's parameters; its backward computes their per-example grads."""

    @staticmethod
    def forward(ctx, call: _Call, *params: Tensor):
        ctx.call, ctx.params = call, params
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *_summed_grads: Tensor):
        call = ctx.call
        if call.output_grads is None:
            raise RuntimeError(
                f"`{call.site.path}`: its parameters received a gradient through a path that does "
                "not pass through the module's outputs; the torch.func fallback cannot attribute "
                "it to examples."
            )
        params = dict(zip(call.names, ctx.params))
        detached = {n: p.detach() for n, p in params.items()}
        grads = call.per_example_grads(detached)
        call.site.record(FallbackUse(params, grads, call.batch_size))
        return (None,) + (None,) * len(ctx.params)


class _OutputTap(torch.autograd.Function):
    """Identity on the module's tensor outputs; its backward records their gradients.

    Returns copies: a custom Function's view output cannot be modified in place, as a plain
    module's output can (``h = block(x); h += r``). A copy, not a view that hides its base
    from autograd, because ops inside the module may have saved these very tensors (``tanh``
    keeps its result), which an in-place change must not reach.
    """

    @staticmethod
    def forward(ctx, call: _Call, *outputs: Tensor):
        ctx.call = call
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        ctx.call.output_grads = grads
        return (None,) + grads


class FuncFallbackRule(Rule):
    """Per-example gradients of a module's own parameters by ``vmap`` + ``vjp`` recomputation."""

    #: Recompute all examples at once under ``vmap``; False loops over them (for kernels such
    #: as the fused recurrent ones that have no batching rule).
    vectorized = True

    def __init__(self, covers_subtree: bool = False) -> None:
        self.covers_subtree = covers_subtree

    def compilable(self, module: nn.Module) -> bool:
        return False

    def example_dims(
        self, module: nn.Module, inputs: list[Any], outputs: list[Tensor]
    ) -> tuple[list[int | None], list[int]]:
        """Where each input leaf and each output tensor holds its examples: dim 0 by default.

        Rules for modules that keep the batch elsewhere (recurrent layers' ``[T, B, H]`` inputs
        and ``[layers, B, H]`` states) override this. ``None`` marks an input that is not a
        tensor or that every example shares.
        """
        in_dims = [0 if isinstance(t, Tensor) and t.dim() > 0 else None for t in inputs]
        return in_dims, [0] * len(outputs)

    def forward(self, site, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        site.announce()
        names = list(site.param_keys)
        call = _Call(site, names, args, kwargs, self.vectorized)
        params = [module.get_parameter(n) for n in names]
        tapped = _ParamTap.apply(call, *params)
        # the forward below sees the tapped tensors (set as functional_call does, so that modules
        # caching their parameters, like nn.LSTM's flat weights, see them too)
        with _reparametrize_module(module, dict(zip(names, tapped))):
            out = site.original_forward(*args, **kwargs)
        leaves, spec = tree_flatten(out)
        positions = [i for i, o in enumerate(leaves) if isinstance(o, Tensor) and o.requires_grad]
        in_dims, out_dims = self.example_dims(module, call.inputs, [leaves[i] for i in positions])
        # Inputs with one row per example are mapped over; one row shared by all is passed whole
        # (vmap broadcasts it); anything else is refused by the site.
        call.input_dims = [
            d if d is not None and not site.is_shared_row(t, d) else None
            for t, d in zip(tree_flatten((args, kwargs))[0], in_dims)
        ]
        call.batch_size = site.clipper.examples
        outputs = []
        for i, d in zip(positions, out_dims):
            o = leaves[i]
            if not site.rows_are_examples(o.shape[d], f"output of shape {tuple(o.shape)}"):
                shape = list(o.shape)
                shape[d] = call.batch_size
                o = o.expand(shape)  # one row every example shares: give each example its own
            outputs.append(o)
        call.output_positions, call.output_dims = positions, out_dims
        tapped_out = _OutputTap.apply(call, *outputs)
        for i, o in zip(positions, tapped_out):
            leaves[i] = o
        return tree_unflatten(leaves, spec)
