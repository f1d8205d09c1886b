"""The naive reference: a loop of single-example backward passes, clipped and summed by hand."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from models import build, examples
from torch import Tensor, nn

import lightning_dp as ldp
from lightning_dp.engine import clipper_of

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


def _custom_groups(model: nn.Module) -> list[list[str]]:
    """Two groups: the first top-level child's parameters and everything else, or, when there
    is nothing else, its weight and its bias (one call feeding two groups)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    first = names[0].split(".")[0]
    rest = sorted({n.rsplit(".", 1)[0] for n in names if n.split(".")[0] != first})
    return [[first], rest] if rest else [names[:1], names[1:]]


def run_case(case, clipping, clip_fn, batch_size, norm_method="auto", freeze=None):
    """Train ``case`` (tests/models.py) privately for one backward and compare every gradient
    and group norm with the loop, in float64, at thresholds that clip about half the examples."""
    model, batch = build(case)
    if freeze:
        for name, p in model.named_parameters():
            if name.startswith(freeze):
                p.requires_grad_(False)
    batch = batch[:batch_size] if batch_size <= batch.shape[0] else batch
    spec = _custom_groups(model) if clipping == "custom" else clipping
    private = ldp.make_private(
        copy.deepcopy(model), clipping=spec, clip_fn=clip_fn, norm_method=norm_method,
        fallback=case.fallback,
    )
    clipper = clipper_of(private)
    groups = {name: g.params for name, g in clipper.groups.items()}
    grads = per_example_grads(model, examples(batch), case.loss)
    thresholds = {g: median_threshold(grads, members) for g, members in groups.items()}
    for name, threshold in thresholds.items():
        clipper.groups[name].threshold = threshold

    case.loss(private, batch).backward()

    expected, ref_norms = clipped_sum(grads, groups, thresholds, clip_fn)
    if batch_size > 1:  # clipping must really be exercised
        assert any(n > thresholds[g] for g, norms in ref_norms.items() for n in norms)
    for name, param in private.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} got a gradient"
            continue
        assert param.grad is not None, f"{name} has no gradient"
        want = expected[name] if batch_size else torch.zeros_like(param)
        torch.testing.assert_close(param.grad, want, rtol=1e-9, atol=1e-10, msg=name)
    for group, norms in ldp.group_norms(private).items():
        torch.testing.assert_close(norms, torch.tensor(ref_norms[group], dtype=norms.dtype), rtol=1e-9, atol=1e-12)
    return private


