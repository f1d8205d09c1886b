"""Warnings where the user's intent is overridden: no noise (not private), a sampler replaced by
Poisson sampling, a noise multiplier ignored on resume (the checkpoint's is used)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from dp_fixtures import Classifier, lightning_dp, toy_dataset, trainer
from torch.utils.data import DataLoader, SubsetRandomSampler, WeightedRandomSampler

from lightning_dp.data import PoissonBatchSampler

N, BATCH = 96, 24


def _dp_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "lightning-dp" in str(w.message)]


def test_noise_multiplier_zero_warns_that_training_is_not_private():
    with pytest.warns(UserWarning, match=r"noise_multiplier=0 adds no noise, so this training is NOT differentially private"):
        strategy = lightning_dp.DPStrategy(noise_multiplier=0.0, seed=0)
    trainer(strategy, max_steps=2).fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))
    assert strategy.private.ledger.steps == 2
    assert math.isinf(strategy.private.ledger.epsilon(1e-3))  # and the ledger says so too


@pytest.mark.parametrize("sampler, words", [
    (WeightedRandomSampler(torch.linspace(0.1, 1.0, N), N), r"WeightedRandomSampler.*example weights are ignored"),
    (SubsetRandomSampler(range(N // 2)), r"SubsetRandomSampler.*subset is ignored.*torch\.utils\.data\.Subset"),
], ids=["weighted", "subset"])
def test_a_sampler_replaced_by_poisson_sampling_warns(sampler, words):
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    fitted = trainer(strategy, max_steps=2)
    with pytest.warns(UserWarning, match=rf"(?s){words}"):
        fitted.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH, sampler=sampler))
    # what the guarantee is accounted for is what ran: Poisson sampling over all N examples
    assert isinstance(fitted.train_dataloader.batch_sampler, PoissonBatchSampler)
    assert strategy.private.num_samples == N and strategy.private.sample_rate == BATCH / N


def test_shuffle_loses_nothing_and_does_not_warn():
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(strategy, max_steps=2).fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH, shuffle=True))
    assert _dp_warnings(record) == []


@pytest.mark.parametrize("resumed_sigma", [2.0, 1.0, None])
def test_a_new_noise_multiplier_is_ignored_on_resume_with_a_warning(tmp_path, resumed_sigma):
    torch.manual_seed(0)
    first = trainer(lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0), max_steps=2)
    first.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))
    first.save_checkpoint(tmp_path / "run.ckpt")
    strategy = lightning_dp.DPStrategy(noise_multiplier=resumed_sigma, seed=0)
    callbacks = [lightning_dp.PrivacyAccountant(target_epsilon=50.0)] if resumed_sigma is None else []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(strategy, callbacks, max_steps=4, max_epochs=3).fit(
            Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH), ckpt_path=tmp_path / "run.ckpt")
    messages = _dp_warnings(record)
    if resumed_sigma == 2.0:
        assert len(messages) == 1 and messages[0].startswith(
            "lightning-dp: noise_multiplier=2.0 is ignored on resume; the run continues with the "
            "checkpoint's noise_multiplier=1.0")
    else:  # the same sigma, or none asked for (the accountant does not recalibrate on resume)
        assert messages == []
    # the checkpoint's sigma is the one used and charged, for every step
    assert strategy.private.privacy.noise_multiplier == 1.0
    assert {entry.noise_multiplier for entry in strategy.private.ledger.history} == {1.0}
    assert strategy.private.ledger.steps == 4


class LogsItsLoss(Classifier):
    def __init__(self, monitor: str) -> None:
        super().__init__()
        self.monitor = monitor

    def training_step(self, batch, batch_idx):
        losses = super().training_step(batch, batch_idx)
        self.log("train_loss", losses.mean())
        return losses

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": self.monitor}}


@pytest.mark.parametrize("monitor", ["train_loss", "val_loss"])
def test_a_scheduler_monitoring_a_training_metric_is_warned_about(monitor, recwarn):
    """ReduceLROnPlateau on the loss training_step logs: the learning rate then follows the
    un-noised training data (a probe's case). A validation metric is fine."""
    loader = DataLoader(toy_dataset(), batch_size=8)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0)
    trainer(strategy, max_steps=3, limit_val_batches=1).fit(LogsItsLoss(monitor), loader, loader)
    warned = [str(w.message) for w in recwarn if "training_step logs from the training data" in str(w.message)]
    expected = ("lightning-dp: ReduceLROnPlateau monitors 'train_loss', which training_step logs from the "
                "training data without noise. What it decides (the learning rate, when to stop, which "
                "checkpoint is kept) then depends on that data outside the privacy guarantee. Monitor a "
                "validation metric on data outside the training set instead.")
    assert warned == ([expected] if monitor == "train_loss" else [])
