"""The released sum moves by at most S = sqrt(sum C_k^2) when one example is removed, and by
exactly S when every group of that example is clipped: the bound is right and tight."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from models import CASES, build

import lightning_dp as ldp


def _summed(model, case, batch, **kwargs):
    private = ldp.make_private(copy.deepcopy(model), fallback=case.fallback, **kwargs)
    case.loss(private, batch).backward()
    return private, torch.cat([p.grad.flatten() for p in private.parameters()])


@pytest.mark.parametrize("clipping", ["flat", "layer", "unit"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp", "tied_lm", "vit", "conv2d")], ids=lambda c: c.name)
def test_removing_one_example_moves_the_sum_by_exactly_s_when_all_clipped(case, clipping):
    model, batch = build(case)
    tiny = 1e-4  # every group of every example is clipped
    private, full = _summed(model, case, batch, clipping=clipping, max_grad_norm=tiny)
    _, without = _summed(model, case, torch.cat([batch[:1], batch[2:]]), clipping=clipping, max_grad_norm=tiny)
    s = ldp.sensitivity(private)
    groups = ldp.group_thresholds(private)
    assert s == pytest.approx(math.sqrt(len(groups)) * tiny)
    assert (full - without).norm().item() == pytest.approx(s, rel=1e-5)


def test_tied_embedding_and_head_form_one_group():
    case = next(c for c in CASES if c.name == "tied_lm")
    model, _ = build(case)
    ldp.make_private(model, clipping="layer", max_grad_norm=1.0)
    groups = ldp.group_thresholds(model)
    assert "embed+head" in groups and "head" not in groups and "embed" not in groups
    assert ldp.sensitivity(model) == pytest.approx(math.sqrt(len(groups)))


def test_sensitivity_with_per_group_thresholds():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    ldp.make_private(model, max_grad_norm={"0": 3.0, "1": 4.0})
    assert ldp.sensitivity(model) == pytest.approx(5.0)
