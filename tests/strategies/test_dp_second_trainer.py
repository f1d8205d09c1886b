"""A model object trained privately by one Trainer is refused by another, with the epsilon
already spent in the message; the same Trainer, or a resumed checkpoint, continues the ledger."""

from __future__ import annotations

import re

import pytest
import torch
from dp_fixtures import Classifier, flat_params, lightning_dp, toy_dataset, trainer
from torch.utils.data import DataLoader

from lightning_dp.accounting import epsilon

N, BATCH, DELTA = 96, 24, 1e-3  # 4 steps per epoch


def _loader():
    return DataLoader(toy_dataset(N), batch_size=BATCH)


def _run(epochs: int, model=None):
    torch.manual_seed(0)
    model = model or Classifier()
    accountant = lightning_dp.PrivacyAccountant(delta=DELTA, accountant="rdp")
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    fitted = trainer(strategy, [accountant], max_epochs=epochs)
    fitted.fit(model, _loader())
    return model, fitted, strategy, accountant


def test_a_second_trainer_on_the_same_model_is_refused_with_the_spent_epsilon():
    model, _, first, accountant = _run(epochs=1)
    spent = first.private.ledger.epsilon(DELTA)
    assert first.private.ledger.steps == 4 and accountant.epsilon == pytest.approx(spent)
    before = flat_params(model)
    second = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=1)
    with pytest.raises(ValueError, match=r"already trained privately by another Trainer: 4 steps") as error:
        trainer(second, [lightning_dp.PrivacyAccountant(delta=DELTA)]).fit(model, _loader())
    reported = float(re.search(r"epsilon=(\S+) at delta=0\.001", str(error.value)).group(1))
    assert reported == pytest.approx(spent, rel=1e-3)  # the first run's epsilon, not 0
    assert second.private.ledger.steps == 0
    torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)


def test_fitting_again_on_the_same_trainer_continues_the_ledger_and_the_stream():
    model, fitted, strategy, accountant = _run(epochs=1)
    first_epsilon = accountant.epsilon
    fitted.fit_loop.max_epochs = 2
    fitted.fit(model, _loader())
    once, _, _, reference_accountant = _run(epochs=2)
    assert strategy.private.ledger.steps == fitted.global_step == 8
    assert accountant.epsilon == pytest.approx(reference_accountant.epsilon) and accountant.epsilon > first_epsilon
    # the same batches and noise as one uninterrupted two-epoch run
    torch.testing.assert_close(flat_params(model), flat_params(once), rtol=0, atol=0)


def test_resuming_a_checkpoint_into_the_same_model_object_is_allowed(tmp_path):
    model, fitted, _, _ = _run(epochs=1)
    path = tmp_path / "first.ckpt"
    fitted.save_checkpoint(path)
    resumed = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    again = trainer(resumed, max_epochs=2)
    again.fit(model, _loader(), ckpt_path=path)
    assert resumed.private.ledger.steps == again.global_step == 8  # the checkpoint's ledger, continued


def test_a_second_fit_at_another_sample_rate_stays_within_the_target():
    """The steps already spent count at their own q: a second fit of the same Trainer with a
    smaller batch used to plan as if all steps ran at the new q, and overran the target."""
    torch.manual_seed(0)
    model, target = Classifier(), 3.0
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=target, delta=DELTA, accountant="rdp")
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.5, seed=0)
    fitted = trainer(strategy, [accountant], max_epochs=2)
    fitted.fit(model, _loader())  # q = 1/4
    ledger = strategy.private.ledger
    spent = ledger.steps
    assert spent == 8 and ledger.epsilon(DELTA) < target
    fitted.fit_loop.max_epochs = 14
    fitted.fit(model, DataLoader(toy_dataset(N), batch_size=8))  # q = 1/12, 12 steps per epoch
    planned = 14 * 12  # Lightning's plan, which would fit the target if every step ran at q = 1/12
    assert epsilon(noise_multiplier=1.5, sample_rate=8 / N, steps=planned, delta=DELTA, accountant="rdp") < target
    ledger = strategy.private.ledger  # rebuilt at train start
    assert spent < ledger.steps < planned  # stopped by the budget, not the plan
    assert ledger.epsilon(DELTA) <= target
    one_more = ledger.epsilon_after(DELTA, noise_multiplier=1.5, sample_rate=8 / N, steps=1)
    assert one_more > target  # it stopped at the last step that fits
