"""What the optimizer steps is what was clipped and noised: parameters the optimizer holds outside
the module are refused, and a parameter frozen between the backward and the step still gets
its noise (found by a careless-user probe: both were released raw)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dp_fixtures import Classifier, flat_params, lightning_dp, toy_dataset, trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_dp.engine import PrivacyLeakError

N, BATCH, C = 32, 8, 1e-3


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with, in parameter order."""

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.released = [None if p.grad is None else p.grad.detach().clone()
                         for group in self.param_groups for p in group["params"]]
        super().step()
        return loss


class ListHead(Classifier):
    """A second head kept in a Python list (not registered) and handed to the optimizer by hand."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.heads = [nn.Linear(8, 3)]

    def forward(self, x):
        return self.net(x) + self.heads[0](x)

    def configure_optimizers(self):
        return RecordingSGD([*self.parameters(), *self.heads[0].parameters()], lr=0.1)


class FreezeAfterBackward(Classifier):
    """Freezes the first layer "from now on" in on_after_backward, after its clipped gradient
    was written and before the noise."""

    def on_after_backward(self):
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=0.1)


def _fit(model, sigma, **strategy):
    torch.manual_seed(0)
    dp = lightning_dp.DPStrategy(noise_multiplier=sigma, max_grad_norm=C, poisson=False, seed=0, **strategy)
    trainer(dp, max_steps=1).fit(model, DataLoader(toy_dataset(N), batch_size=BATCH))
    return dp


@pytest.mark.parametrize("clipping", ["layer", "flat"])
def test_optimizer_parameters_outside_the_module_are_refused(clipping):
    model = ListHead()
    before = torch.cat([flat_params(model), flat_params(model.heads[0])])
    with pytest.raises(PrivacyLeakError, match=r"not parameters of the ListHead.*param_groups\[0\]\['params'\]\[4\] "
                                               r"of shape \[3, 8\].*nn.ModuleList"):
        _fit(model, 1.0, clipping=clipping)
    assert torch.equal(torch.cat([flat_params(model), flat_params(model.heads[0])]), before)  # nothing stepped


def test_the_same_head_registered_trains_within_the_bound():
    """Negative control: with the head in an nn.ModuleList it is clipped like the rest."""
    class Registered(ListHead):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(self.heads)

        def configure_optimizers(self):
            return RecordingSGD(self.parameters(), lr=0.1)

    model = Registered()
    dp = _fit(model, 0.0, clipping="flat")
    released = torch.cat([g.flatten() for g in model.trainer.optimizers[0].released]).double()
    assert released.norm() * dp.private.expected_batch_size <= BATCH * C * (1 + 1e-5)


def test_a_parameter_frozen_after_the_backward_is_noised_and_normalised():
    first = slice(0, 2)  # net[0].weight and net[0].bias come first in the optimizer
    clean = FreezeAfterBackward()
    dp = _fit(clean, 0.0)
    noisy = FreezeAfterBackward()
    _fit(noisy, 1.0)
    released0 = clean.trainer.optimizers[0].released[first]
    released1 = noisy.trainer.optimizers[0].released[first]
    # without noise: the clipped sum divided by qN, so its norm is within B C / (qN)
    scaled = math.sqrt(sum(float(g.double().pow(2).sum()) for g in released0)) * dp.private.expected_batch_size
    assert 0 < scaled <= BATCH * C * (1 + 1e-5)  # net[0] is one per-layer group
    # with noise: each coordinate moved by N(0, (sigma S / qN)^2), S = C sqrt(2 groups)
    noise = torch.cat([(b - a).flatten() for a, b in zip(released0, released1)]).double()
    std = 1.0 * C * math.sqrt(2) / dp.private.expected_batch_size
    assert noise.numel() == 8 * 16 + 16
    assert 0.8 < float(noise.std()) / std < 1.2  # 144 draws: the ratio's sd is about 0.06
    assert not noisy.net[0].weight.requires_grad  # the user's freeze stands


class Centering(Classifier):
    """DINO-style centring: a buffer holding a running mean of the batch's outputs, subtracted
    from the logits of later steps (a probe measured releases that move with an example that
    was not sampled, and the buffer itself saved without noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(3))
        self.register_buffer("static", torch.ones(3))  # never written: no warning

    def forward(self, x):
        return self.net(x) - self.center + 0 * self.static

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.center.mul_(0.9).add_(0.1 * self(batch[0]).mean(0))


class ReassignedCentering(Centering):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            self.center = 0.9 * self.center + 0.1 * self(batch[0]).mean(0)  # a new tensor


@pytest.mark.parametrize("model", [Centering, ReassignedCentering], ids=["in place", "reassigned"])
def test_a_buffer_computed_from_the_data_is_warned_about(model):
    with pytest.warns(UserWarning, match=r"buffers \['center'\] of the \w*Centering changed during training.*without noise"):
        _fit_steps(model(), 3)


class StaticCentering(Centering):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        pass


def test_no_warning_when_no_buffer_changes(recwarn):
    _fit_steps(Classifier(), 3)
    _fit_steps(StaticCentering(), 3)
    assert not [w for w in recwarn if "changed during training" in str(w.message)]


def _fit_steps(model, steps):
    dp = lightning_dp.DPStrategy(noise_multiplier=1.0, max_grad_norm=C, seed=0)
    trainer(dp, max_steps=steps).fit(model, DataLoader(toy_dataset(N), batch_size=BATCH))
