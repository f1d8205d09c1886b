"""A NaN/inf example is zeroed and counted; the rest of the update is unchanged."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from models import CASES, build

import lightning_dp as ldp
from lightning_dp.engine import clipper_of

base = importlib.import_module("lightning_dp.rules.base")


@pytest.fixture(params=["host", "accelerator"])
def zeroing(request, monkeypatch):
    """The host skips the zeroing pass when no clip factor is 0 (it can read that for free); an
    accelerator (and a compiled graph) always runs it. Both must give the same sums."""
    if request.param == "accelerator":
        monkeypatch.setattr(base, "_host_knows", lambda tensor: False)
    return request.param


@pytest.mark.parametrize("clipping", ["flat", "layer"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp", "seq_linear", "conv2d", "norms", "vit")], ids=lambda c: c.name)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_example_is_zeroed_and_counted(case, clipping, poison, zeroing):
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


@pytest.mark.parametrize("clipping", ["layer", "flat"])
def test_a_gradient_that_cancels_over_tokens_keeps_a_finite_norm(clipping):
    """Output gradients of alternating sign on nearly equal inputs: each example's weight
    gradient nearly cancels over its tokens, and its ghost norm (a sum of large Gram terms)
    rounds below 0 for about half of them. The norm must stay a number (0, or the rounding
    error's root: true norms here are about 6e-3, the Gram terms about 3e4), not the NaN of a
    negative root, which would drop the example and count it as non-finite."""
    torch.manual_seed(0)
    tokens = 8
    model = ldp.make_private(torch.nn.Sequential(torch.nn.Linear(16, 32)), clipping=clipping,
                             max_grad_norm=1.0, norm_method="ghost")
    x = torch.randn(1, 1, 16).expand(32, tokens, 16) + 1e-4 * torch.randn(32, tokens, 16)
    sign = torch.tensor([1.0, -1.0] * (tokens // 2)).view(1, tokens, 1)
    (model(x) * sign * torch.randn(32)).sum().backward()
    for stats in clipper_of(model).stats.values():
        assert int(stats.nonfinite) == 0
        assert (stats.norms >= 0).all() and (stats.norms < 0.1).all()
    assert torch.isfinite(model[0].weight.grad).all()


@pytest.mark.parametrize("norm_method", ["instantiate", "ghost"])
@pytest.mark.parametrize("clipping", ["layer", "flat"])
def test_an_overflowing_example_is_zeroed(clipping, norm_method, zeroing):
    """An example whose weight gradient overflows to +inf without any NaN (positive inputs near
    float32's largest): its norm is inf, its factor exactly 0, and its instantiated rows hold
    inf, which times 0 is NaN. The clipped sums must leave it out, not add that NaN."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.rand(6, 5, 4) + 0.5
    private = ldp.make_private(copy.deepcopy(model), clipping=clipping, max_grad_norm=1.0,
                               norm_method=norm_method)
    reference = ldp.make_private(copy.deepcopy(model), clipping=clipping, max_grad_norm=1.0,
                                 norm_method=norm_method)
    huge = x.clone()
    huge[3] = 1e38
    private(huge).sum().backward()
    reference(torch.cat([x[:3], x[4:]])).sum().backward()

    stats = clipper_of(private).stats
    assert all(torch.isinf(s.norms[3]) and int(s.nonfinite) == 1 for s in stats.values())
    for (name, p), q in zip(private.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
