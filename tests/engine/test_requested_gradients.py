"""Backwards that ask for other tensors' gradients (adversarial examples, saliency) leave the
parameters' .grad alone, as plain PyTorch does: had the clipper written a clipped sum for them
too, each example would enter the step's sum once per such backward."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from oracle import clipped_sum, per_example_grads
from torch import nn

import lightning_dp as ldp
from lightning_dp.engine.requested import GradientOfParameterError

clipper_module = importlib.import_module("lightning_dp.engine.clipper")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(3, (n,), generator=g)


def _adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """PGD (FGSM for one step): the gradient of the loss with respect to the input only."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
        adv = (adv.detach() + 0.1 * grad.sign()).clamp(x - 0.3, x + 0.3)
    return adv.detach()


def _private_sum(model: nn.Module, x, y, steps: int, threshold: float, clipping: str) -> torch.Tensor:
    private = ldp.make_private(copy.deepcopy(model), clipping=clipping, max_grad_norm=threshold)
    adv = _adversarial(private, x, y, steps)  # zero_grad at the top of the step, as loops do
    F.cross_entropy(private(adv), y, reduction="none").sum().backward()
    return torch.cat([p.grad.flatten() for p in private.parameters()])


@pytest.mark.parametrize("clipping", ["flat", "layer"])
@pytest.mark.parametrize("steps", [1, 5], ids=["fgsm", "pgd5"])
def test_adversarial_training_clips_each_example_once(steps, clipping, monkeypatch):
    """Exact against the loop of single examples, each attacked alone; leaving one out moves
    the sum by at most the sensitivity. Negative control: a clipper that writes .grad for the
    attack's backwards too (as it did) moves it by about steps + 1 times that."""
    model, (x, y) = _model(), _data()
    threshold = 1e-3  # below every example's norm
    names = [n for n, _ in model.named_parameters()]
    examples = [(x[i : i + 1], y[i : i + 1]) for i in range(len(y))]

    def loss(m, example):
        adv = _adversarial(m, *example, steps)
        m.zero_grad(set_to_none=True)
        return F.cross_entropy(m(adv), example[1], reduction="sum")

    grads = per_example_grads(model, examples, loss)
    layers = {k: [n for n in names if n.startswith(k + ".")] for k in ("0", "2")}
    groups = {"flat": names} if clipping == "flat" else layers
    thresholds = dict.fromkeys(groups, threshold)
    expected, norms = clipped_sum(grads, groups, thresholds)
    assert min(min(v) for v in norms.values()) > threshold
    sensitivity = threshold * len(groups) ** 0.5

    full = _private_sum(model, x, y, steps, threshold, clipping)
    torch.testing.assert_close(full, torch.cat([expected[n].flatten() for n in names]), rtol=1e-7, atol=1e-12)
    moved = float((full - _private_sum(model, x[1:], y[1:], steps, threshold, clipping)).norm())
    assert moved <= sensitivity * (1 + 1e-6)

    monkeypatch.setattr(clipper_module, "parameter_requested", lambda param: True)
    leaked = _private_sum(model, x, y, steps, threshold, clipping) - _private_sum(model, x[1:], y[1:], steps, threshold, clipping)
    assert float(leaked.norm()) > (steps + 0.5) * sensitivity


def test_backward_for_chosen_inputs_writes_only_theirs():
    private = ldp.make_private(_model())
    x, y = _data()
    x.requires_grad_(True)
    F.cross_entropy(private(x), y, reduction="none").sum().backward(inputs=[x])
    assert x.grad is not None and all(p.grad is None for p in private.parameters())
    F.cross_entropy(private(x), y, reduction="none").sum().backward(inputs=list(private[2].parameters()))
    assert private[0].weight.grad is None and private[2].weight.grad is not None


def test_autograd_grad_of_a_private_parameter_is_refused():
    """A MAML-style inner step: autograd.grad returned None for every parameter (the update
    silently did nothing) and wrote a clipped sum into .grad besides."""
    private = ldp.make_private(_model())
    x, y = _data()
    loss = F.cross_entropy(private(x), y, reduction="none").sum()
    with pytest.raises(GradientOfParameterError, match=r"autograd.grad was asked for the gradient of a private parameter.*\.backward\(\)"):
        torch.autograd.grad(loss, list(private.parameters()), allow_unused=True)
