"""Whether the running backward asks for a parameter's gradient.

The clipper writes ``.grad`` itself, so it must do what autograd would: ``loss.backward()``
accumulates into every parameter, while ``torch.autograd.grad(loss, x)`` and
``loss.backward(inputs=[x])`` leave parameters alone. Adversarial training (FGSM, PGD), saliency
maps and input-gradient penalties ask for input gradients; had the clipper written a clipped sum
for them too, each example would enter the step's sum once per such backward (a probe measured
2 C leave-one-out for FGSM, 6 C for 5 PGD steps). The engine is asked through the parameter's
``AccumulateGrad`` node, found among the running node's inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GradientOfParameterError(RuntimeError):
    """``torch.autograd.grad`` was asked for a private parameter's gradient."""


def parameter_requested(param: Tensor) -> bool:
    """True when this backward accumulates into ``param`` (and when that cannot be told)."""
    accumulator = _accumulator(torch._C._current_autograd_node(), param)
    if accumulator is None:
        return True
    try:
        return torch._C._will_engine_execute_node(accumulator)
    except RuntimeError:  # the engine's answer for a leaf that autograd.grad() captures
        raise GradientOfParameterError(
            "lightning-dp: torch.autograd.grad was asked for the gradient of a private "
            "parameter. Per-example clipping delivers parameter gradients only into .grad, "
            "through loss.backward() (or loss.backward(inputs=[...])); autograd.grad would "
            "return none (a MAML-style inner step would silently not move). Use .backward() "
            "and read .grad."
        ) from None


def _accumulator(node: object, param: Tensor, hops: int = 3) -> object | None:
    """``param``'s ``AccumulateGrad`` among the inputs of ``node`` (through a few casts or
    views, as autocast makes), or None."""
    frontier = [node] if node is not None else []
    for _ in range(hops):
        following = []
        for current in frontier:
            for function, _ in current.next_functions:
                if function is None:
                    continue
                if getattr(function, "variable", None) is param:
                    return function
                following.append(function)
        frontier = following
    return None
