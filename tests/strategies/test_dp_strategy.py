"""Trainer(strategy="dp"): the DP step against plain Lightning and the engine's oracle."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from dp_fixtures import Classifier, flat_params, toy_dataset, trainer
from torch.utils.data import DataLoader

import lightning_dp
from lightning_dp.accounting import epsilon
from lightning_dp.data import PoissonBatchSampler
from lightning_dp.strategies.poisson_loader import ExampleRowsCollate

N, BATCH, SEED = 96, 12, 7


class PlainSumOverExpected(Classifier):
    """Non-private reference: sum of per-example losses divided by the expected batch q*N."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="sum") / BATCH


def test_registered_as_dp_and_sampler_is_poisson_after_setup():
    model = Classifier()
    t = trainer("dp", max_steps=1)
    t.strategy.private.privacy.noise_multiplier = 0.0
    t.fit(model, DataLoader(toy_dataset(N), batch_size=BATCH, shuffle=True))
    assert isinstance(t.strategy, lightning_dp.DPStrategy)
    loader = t.train_dataloader
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert loader.batch_sampler.sample_rate == pytest.approx(BATCH / N)


def test_noise_zero_huge_threshold_equals_plain_training_on_the_same_poisson_batches():
    """Sum-then-divide semantics: update = sum_i g_i / (qN), whatever the realised size."""
    torch.manual_seed(0)
    dp_model = Classifier()
    plain_model = PlainSumOverExpected()
    plain_model.load_state_dict(dp_model.state_dict())
    data = toy_dataset(N)

    strategy = lightning_dp.DPStrategy(noise_multiplier=0.0, max_grad_norm=1e9, seed=SEED)
    trainer(strategy, max_epochs=2).fit(dp_model, DataLoader(data, batch_size=BATCH))

    sampler = PoissonBatchSampler(N, BATCH / N, generator=SEED)
    plain_loader = DataLoader(data, batch_sampler=sampler, collate_fn=ExampleRowsCollate(torch.utils.data.default_collate, data))
    trainer("auto", max_epochs=2).fit(plain_model, plain_loader)

    torch.testing.assert_close(flat_params(dp_model), flat_params(plain_model), rtol=1e-5, atol=1e-6)
    assert strategy.private.ledger.steps == 2 * round(N / BATCH)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_clipping_on_noise_zero_one_step_equals_the_oracle(reduction):
    from oracle import clipped_sum, per_example_grads

    torch.manual_seed(0)
    model = Classifier(reduction=reduction, lr=1.0)
    before = copy.deepcopy(model.net)
    data = toy_dataset(N)
    strategy = lightning_dp.DPStrategy(noise_multiplier=0.0, max_grad_norm=0.3, seed=SEED)
    trainer(strategy, max_steps=1).fit(model, DataLoader(data, batch_size=BATCH))

    indices = next(iter(PoissonBatchSampler(N, BATCH / N, generator=SEED)))
    x, y = data.tensors[0][indices], data.tensors[1][indices]
    examples = [(x[i : i + 1], y[i : i + 1]) for i in range(len(indices))]
    loss = lambda m, ex: F.cross_entropy(m(ex[0]), ex[1], reduction="sum")  # noqa: E731
    grads = per_example_grads(before, examples, loss)
    groups = {"net.0": ["0.weight", "0.bias"], "net.2": ["2.weight", "2.bias"]}
    expected, norms = clipped_sum(grads, groups, {"net.0": 0.3, "net.2": 0.3})
    assert any(n > 0.3 for values in norms.values() for n in values)  # clipping exercised
    for name, p in before.named_parameters():
        want = p.detach() - 1.0 * expected[name] / BATCH
        torch.testing.assert_close(model.net.get_parameter(name).detach(), want, rtol=1e-5, atol=1e-6)


def test_micro_batches_change_nothing_but_memory():
    """One noise draw and one accountant step per logical batch, however it is split."""
    results = []
    for size in (None, 5, 1):
        torch.manual_seed(0)
        model = Classifier()
        strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=SEED, max_physical_batch_size=size)
        trainer(strategy, max_steps=5).fit(model, DataLoader(toy_dataset(N), batch_size=BATCH))
        results.append((flat_params(model), strategy.private.ledger.steps))
    for params, steps in results[1:]:
        torch.testing.assert_close(params, results[0][0], rtol=1e-5, atol=1e-6)
        assert steps == results[0][1] == 5


def test_empty_poisson_batch_still_adds_noise_and_counts_a_step():
    torch.manual_seed(0)
    model = Classifier()
    before = flat_params(model)
    tiny = toy_dataset(4)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=SEED)
    sampler_rate = 1 / 4  # (1 - 1/4)^4 = 0.32 of batches are empty
    t = trainer(strategy, max_steps=12, max_epochs=3)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].shape[0])

    t.callbacks.append(Spy())
    t.fit(model, DataLoader(tiny, batch_size=1))
    assert 0 in seen, seen
    assert strategy.private.ledger.steps == 12 == t.global_step
    assert not torch.equal(flat_params(model), before)
    assert strategy.private.sample_rate == sampler_rate


def test_digits_end_to_end_beats_chance_and_logs_the_accountants_epsilon():
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    train, test = TensorDataset(x[:1400], y[:1400]), (x[1400:], y[1400:])
    L.seed_everything(0)
    model = Classifier(d=64, classes=10, lr=2.0)
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=2.0, accountant="rdp")
    strategy = lightning_dp.DPStrategy(max_grad_norm=1.0)
    t = trainer(strategy, callbacks=[accountant], max_epochs=6)
    t.fit(model, DataLoader(train, batch_size=64))
    with torch.no_grad():
        accuracy = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.1
    q, steps = 64 / 1400, t.global_step
    want = epsilon(noise_multiplier=strategy.private.privacy.noise_multiplier, sample_rate=q,
                   steps=steps, delta=accountant.delta, accountant="rdp")
    assert accountant.epsilon == pytest.approx(want, rel=1e-9) and want <= 2.0
    assert float(t.callback_metrics["epsilon"]) == pytest.approx(want, rel=1e-6)
    assert steps == 6 * round(1400 / 64)


def test_training_stops_before_the_budget_is_exceeded():
    model = Classifier()
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=1.0, accountant="rdp")
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0)
    t = trainer(strategy, callbacks=[accountant], max_epochs=50)
    t.fit(model, DataLoader(toy_dataset(N), batch_size=BATCH))
    q = BATCH / N
    spent = epsilon(noise_multiplier=1.0, sample_rate=q, steps=t.global_step, delta=accountant.delta, accountant="rdp")
    one_more = epsilon(noise_multiplier=1.0, sample_rate=q, steps=t.global_step + 1, delta=accountant.delta, accountant="rdp")
    assert spent <= 1.0 < one_more
    assert t.global_step < 50 * round(N / BATCH)


class WithValidation(Classifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def test_validation_runs_the_plain_model_and_charges_nothing():
    model = WithValidation()
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=SEED)
    t = trainer(strategy, max_epochs=2, num_sanity_val_steps=2)
    data = DataLoader(toy_dataset(N), batch_size=BATCH)
    t.fit(model, data, DataLoader(toy_dataset(40, seed=1), batch_size=20))
    assert strategy.private.ledger.steps == t.global_step == 2 * round(N / BATCH)
    t.validate(model, DataLoader(toy_dataset(40, seed=1), batch_size=20), verbose=False)
    assert strategy.private.ledger.steps == t.global_step  # validation charged no budget
    assert "val_loss" in t.callback_metrics


@pytest.mark.parametrize("enabled", [False, True])
def test_raw_clip_fraction_is_logged_only_on_request(enabled):
    """The raw clip fraction is a non-noised statistic of the data: off unless asked for."""
    accountant = lightning_dp.PrivacyAccountant(accountant="rdp", log_clip_fraction=enabled)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=SEED)
    t = trainer(strategy, callbacks=[accountant], max_steps=2, log_every_n_steps=1)
    t.fit(Classifier(), DataLoader(toy_dataset(N), batch_size=BATCH))
    logged = set(t.callback_metrics)
    assert {"epsilon", "dp/threshold/net.0"} <= logged
    assert ("dp/clip_fraction/net.0" in logged) == enabled
