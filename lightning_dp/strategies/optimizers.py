"""One closure evaluation per optimizer step: one noisy release per logical batch.

Each evaluation of the training closure clips, adds noise and charges the ledger one
Poisson-subsampled step. An optimizer that evaluates it several times per step (LBFGS's line
search and inner iterations, SAM's two passes) releases the same batch repeatedly; the
accountant would charge those as independent subsampled steps, which understates their cost.
Such optimizers are refused by name before the first step, and any other optimizer is stopped
at its second evaluation of one step, before that evaluation releases anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import LBFGS, Optimizer

#: optimizers known to evaluate the closure more than once per step
MULTI_EVALUATION_OPTIMIZERS: tuple[type[Optimizer], ...] = (LBFGS,)

_FIX = (
    "Use an optimizer that evaluates the closure once per step (SGD, Adam, AdamW, ...): each "
    "evaluation is one noisy release of the same Poisson batch, charged as an independent "
    "subsampled step, so repeated evaluations would cost more privacy than is reported."
)


def refuse_multi_evaluation_optimizer(optimizer: Optimizer) -> None:
    """Refuse an optimizer known to call the closure several times per step."""
    inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the optimizer
    if isinstance(inner, MULTI_EVALUATION_OPTIMIZERS):
        kind = f"{type(inner).__module__}.{type(inner).__name__}"
        raise ValueError(  # noqa: TRY004  (a refused setting, like the strategies' other refusals)
            f"lightning-dp: the optimizer is {kind}, which evaluates the training closure several "
            f"times per step (line search / inner iterations). {_FIX}"
        )


def evaluated_once(closure: Callable[[], Any], optimizer: Optimizer) -> Callable[[], Any]:
    """``closure``, refusing a second evaluation within the same optimizer step."""
    calls = 0

    def once() -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError(
                f"lightning-dp: {type(optimizer).__name__} evaluated the training closure a second "
                "time in one optimizer step; the step was stopped before that evaluation added "
                f"noise or was charged (the first evaluation's release is charged). {_FIX}"
            )
        return closure()

    return once
