"""The naive reference: a loop of single-example backward passes, clipped and summed by hand."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, object], Tensor]


def per_example_grads(model: nn.Module, inputs: list, loss_fn: LossFn) -> list[dict[str, Tensor]]:
    """Gradient of each example's loss alone, from an unmodified copy of the model."""
    model = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = []
    for example in inputs:
        model.zero_grad(set_to_none=True)
        loss_fn(model, example).backward()
        grads.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()})
    return grads


def clip_factor(norm: float, threshold: float, clip_fn: str, gamma: float) -> float:
    if not math.isfinite(norm):
        return 0.0
    if clip_fn == "abadi":
        return min(1.0, threshold / (norm + 1e-6))
    return threshold / (norm + gamma)


def clipped_sum(
    grads: list[dict[str, Tensor]],
    groups: dict[str, list[str]],
    thresholds: dict[str, float],
    clip_fn: str = "abadi",
    gamma: float = 0.01,
) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """Sum over examples of each group's gradient clipped to its threshold; and the norms."""
    names = [n for members in groups.values() for n in members]
    total = {n: torch.zeros_like(grads[0][n]) for n in names} if grads else {}
    norms: dict[str, list[float]] = {g: [] for g in groups}
    for example in grads:
        for group, members in groups.items():
            norm = math.sqrt(sum(float(example[n].pow(2).sum()) for n in members))
            norms[group].append(norm)
            factor = clip_factor(norm, thresholds[group], clip_fn, gamma)
            for n in members:
                if factor != 0.0:
                    total[n] += factor * example[n]
    return total, norms


def median_threshold(grads: list[dict[str, Tensor]], members: list[str]) -> float:
    """A threshold that clips about half the examples, so clipping is really exercised."""
    norms = sorted(math.sqrt(sum(float(g[n].pow(2).sum()) for n in members)) for g in grads)
    return norms[len(norms) // 2] * 0.9 if norms else 1.0


def thresholds_against_oracle(
    model: nn.Module, private: nn.Module, examples: list, loss_fn: LossFn, clip_fn: str = "abadi"
) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """Set each of ``private``'s groups to clip about half the examples (from the single-example
    norms of an unmodified ``model``), check that some are clipped, and return the oracle's
    clipped sum and per-example group norms for those thresholds."""
    from lightning_dp.engine import clipper_of

    clipper = clipper_of(private)
    groups = {name: g.params for name, g in clipper.groups.items()}
    grads = per_example_grads(model, examples, loss_fn)
    thresholds = {g: median_threshold(grads, members) for g, members in groups.items()}
    for name, threshold in thresholds.items():
        clipper.groups[name].threshold = threshold
    expected, norms = clipped_sum(grads, groups, thresholds, clip_fn)
    assert any(n > thresholds[g] for g, values in norms.items() for n in values)
    return expected, norms
