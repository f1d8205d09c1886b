"""The leak guard of compiled parameters: a gradient is accepted only as it left a compiled graph.

Compiled primitives hand their clipped gradients to autograd, which sums everything a leaf
receives before any hook of the leaf sees it, so the eager guard (which refuses every gradient
autograd delivers) cannot run there. Instead, the backward node of each compiled graph a loss
reaches is watched: its post-hook keeps the gradients it computed for the parameters, and the
parameter's hook accepts its incoming gradient only when it is that very tensor. A second
contribution (a loss term reading the weight outside its module, switched on after the eager
first step: a probe measured 150 C) makes autograd sum the two into another tensor, refused
before it reaches ``.grad``. Holding the graph's gradient keeps autograd from summing into it
in place, which would keep its storage.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten


class CompiledGradients:
    """Per leaf tensor, the gradients compiled graphs computed for it in the running backward."""

    def __init__(self) -> None:
        self._watched: set[int] = set()
        self._from_graphs: dict[int, list[Tensor]] = {}

    def watch(self, output: Any) -> None:
        """Watch the compiled graphs whose outputs ``output`` (a loss, a model's output) was
        computed from: their backward nodes, found by walking back from it. What an earlier
        backward left unclaimed (gradients of leaves that are no guarded parameter) is dropped."""
        self._from_graphs.clear()
        frontier = [t.grad_fn for t in tree_flatten(output)[0]
                    if isinstance(t, Tensor) and t.grad_fn is not None]
        seen: set[int] = set()
        while frontier:
            node = frontier.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if type(node).__name__ == "CompiledFunctionBackward" and id(node) not in self._watched:
                self._watched.add(id(node))
                node.register_hook(self._keep(node))
            frontier.extend(fn for fn, _ in node.next_functions if fn is not None and not hasattr(fn, "variable"))

    def _keep(self, node: Any):
        def keep(grad_inputs: tuple, grad_outputs: tuple) -> None:
            self._watched.discard(id(node))
            for (fn, _), grad in zip(node.next_functions, grad_inputs):
                leaf = getattr(fn, "variable", None) if fn is not None else None
                if grad is not None and leaf is not None:
                    self._from_graphs.setdefault(id(leaf), []).append(grad)
        return keep

    def came_from_graph(self, param: Tensor, grad: Tensor) -> bool:
        """True when ``grad``, arriving at ``param``, is a gradient a compiled graph computed."""
        kept = self._from_graphs.pop(id(param), [])
        return any(grad.data_ptr() == g.data_ptr() and grad.shape == g.shape for g in kept)
