"""One optimizer step is one noisy release: ledger steps equal optimizer steps, and optimizers
that evaluate the closure several times per step are refused before they release again."""

from __future__ import annotations

import pytest
import torch
from dp_fixtures import Classifier, flat_params, lightning_dp, toy_dataset, trainer
from torch.utils.data import DataLoader

N, BATCH, STEPS = 96, 24, 6


class WithOptimizer(Classifier):
    def __init__(self, make_optimizer) -> None:
        super().__init__()
        self.make_optimizer, self.optimizer_steps = make_optimizer, 0

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.parameters())
        optimizer.register_step_post_hook(lambda *_: setattr(self, "optimizer_steps", self.optimizer_steps + 1))
        return optimizer


class TwoPassOptimizer(torch.optim.SGD):
    """SAM-like: evaluates the closure twice per step."""

    def step(self, closure=None):
        closure()
        closure()
        return super().step()


def _fit(make_optimizer):
    torch.manual_seed(0)
    model = WithOptimizer(make_optimizer)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    fitted = trainer(strategy, max_steps=STEPS, max_epochs=2)
    return model, strategy, fitted, DataLoader(toy_dataset(N), batch_size=BATCH)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.Adam(p, lr=1e-2),
], ids=["SGD", "Adam"])
def test_ledger_steps_equal_optimizer_steps(make_optimizer):
    model, strategy, fitted, loader = _fit(make_optimizer)
    fitted.fit(model, loader)
    assert model.optimizer_steps == strategy.private.ledger.steps == fitted.global_step == STEPS


@pytest.mark.parametrize("make_optimizer, error, charged", [
    (lambda p: torch.optim.LBFGS(p, lr=0.1), r"torch\.optim\.lbfgs\.LBFGS.*several times per step", 0),
    (lambda p: TwoPassOptimizer(p, lr=0.1), r"TwoPassOptimizer evaluated the training closure a second time", 1),
], ids=["LBFGS", "two-pass"])
def test_optimizers_evaluating_the_closure_twice_are_refused(make_optimizer, error, charged):
    model, strategy, fitted, loader = _fit(make_optimizer)
    before = flat_params(model)
    with pytest.raises((ValueError, RuntimeError), match=error):
        fitted.fit(model, loader)
    # LBFGS: refused before anything ran; two-pass: the first release is charged, the second never happens
    assert strategy.private.ledger.steps == charged
    assert model.optimizer_steps == 0
    torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)
