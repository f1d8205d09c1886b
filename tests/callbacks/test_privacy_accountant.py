"""The epsilon the PrivacyAccountant logs is the ledger's, also when computing it is slow."""

from __future__ import annotations

import importlib

import pytest
import torch
from dp_fixtures import Classifier, lightning_dp, toy_dataset, trainer
from torch.utils.data import DataLoader

accountant_module = importlib.import_module("lightning_dp.callbacks.privacy_accountant")


def test_the_last_logged_epsilon_is_the_spent_one_when_refreshing_is_slow(monkeypatch):
    """A probe saw the progress bar and loggers keep step 1's epsilon for a whole 32-step run:
    the first PLD answer took over 20 ms, so it was refreshed only every log_every_n_steps."""
    monkeypatch.setattr(accountant_module, "_CHEAP_SECONDS", 0.0)  # every refresh counts as slow
    torch.manual_seed(0)
    accountant = lightning_dp.PrivacyAccountant(delta=1e-3, accountant="rdp")
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    fitted = trainer(strategy, [accountant], max_steps=12, max_epochs=3, log_every_n_steps=50)
    fitted.fit(Classifier(), DataLoader(toy_dataset(96), batch_size=24))
    spent = strategy.private.ledger.epsilon(1e-3)
    assert strategy.private.ledger.steps == 12
    assert accountant.epsilon == spent
    assert float(fitted.callback_metrics["epsilon"]) == pytest.approx(spent, rel=1e-6)  # logged as float32
