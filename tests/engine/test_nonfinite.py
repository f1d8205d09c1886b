"""A NaN/inf example is zeroed and counted; the rest of the update is unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES, build

import lightning_dp as ldp
from lightning_dp.engine import clipper_of


@pytest.mark.parametrize("clipping", ["flat", "layer"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp", "seq_linear", "conv2d", "norms", "vit")], ids=lambda c: c.name)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_example_is_zeroed_and_counted(case, clipping, poison):
    model, batch = build(case)
    poisoned = batch.clone()
    poisoned[2] = poison
    clean = torch.cat([batch[:2], batch[3:]])

    private = ldp.make_private(copy.deepcopy(model), clipping=clipping, max_grad_norm=0.5, fallback=case.fallback)
    reference = ldp.make_private(copy.deepcopy(model), clipping=clipping, max_grad_norm=0.5, fallback=case.fallback)
    case.loss(private, poisoned).backward()
    case.loss(reference, clean).backward()

    for (name, p), q in zip(private.named_parameters(), reference.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    stats = clipper_of(private).stats
    assert all(int(s.nonfinite) == 1 for s in stats.values())
    assert all(not torch.isfinite(s.norms[2]) for s in stats.values())


def test_nan_in_an_embedding_gradient_is_zeroed():
    case = next(c for c in CASES if c.name == "embedding")
    model, ids = build(case)
    private = ldp.make_private(model, clipping="flat")
    out = private(ids)
    weights = torch.ones(out.shape[0], 1, 1, dtype=out.dtype)
    weights[1] = float("nan")
    (out * weights).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in private.parameters())
    assert int(clipper_of(private).stats["flat"].nonfinite) == 1
