"""Parametrized layers (``torch.nn.utils.parametrizations``): the weight is computed from other
parameters at every call, so the class's rule cannot clip it. The torch.func fallback
recomputes the module whole (exact against the single-example loop), or it is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import thresholds_against_oracle
from torch import nn
from torch.nn.utils import parametrizations

import lightning_dp as ldp

PARAMETRIZE = {
    "weight_norm": parametrizations.weight_norm,
    "orthogonal": parametrizations.orthogonal,
    "spectral_norm": parametrizations.spectral_norm,
}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(PARAMETRIZE[kind](nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 3)).double()


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


@pytest.mark.parametrize("clipping", ["layer", "flat"])
@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_parametrized_linear_is_exact_with_the_fallback(kind, clipping):
    model = _model(kind).eval()  # spectral_norm's power iteration runs in training mode only
    x, y = torch.randn(6, 4, dtype=torch.float64) * 2, torch.tensor([0, 1, 2, 0, 1, 2])
    private = ldp.make_private(copy.deepcopy(model), clipping=clipping, fallback=True)
    expected, _ = thresholds_against_oracle(model, private, [(x[i : i + 1], y[i : i + 1]) for i in range(6)], _loss)
    _loss(private, (x, y)).backward()
    for name, param in private.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert "0.parametrizations.weight.original" in " ".join(expected)


def test_parametrized_linear_is_refused_without_the_fallback():
    with pytest.raises(ValueError, match=r"(?s)`0` \(ParametrizedLinear\): \['bias', "
                                         r"'parametrizations.weight.original0'.*fallback=True"):
        ldp.make_private(_model("weight_norm"))
