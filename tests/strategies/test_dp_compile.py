"""Trainer(strategy=DPStrategy(compile=True)): same training as eager, one graph for all steps."""

from __future__ import annotations

import pytest
import torch
from dp_fixtures import Classifier, flat_params, toy_dataset, trainer
from torch.utils.data import DataLoader

import lightning_dp
from lightning_dp.data import PoissonBatchSampler

N, BATCH, SEED = 96, 12, 7


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fit(compile: bool, reduction: str = "none") -> tuple[torch.Tensor, lightning_dp.DPStrategy]:
    torch.manual_seed(0)
    model = Classifier(reduction=reduction)
    strategy = lightning_dp.DPStrategy(
        noise_multiplier=0.5, max_grad_norm=0.5, clipping="flat", seed=SEED, compile=compile,
    )
    trainer(strategy, max_epochs=2).fit(model, DataLoader(toy_dataset(N), batch_size=BATCH))
    return flat_params(model), strategy


def test_compiled_strategy_trains_like_eager_without_recompiling_on_poisson_sizes():
    eager, eager_strategy = _fit(compile=False)
    torch._dynamo.utils.counters.clear()
    compiled, strategy = _fit(compile=True, reduction="mean")  # padding must not bias a mean

    sizes = {len(batch) for batch in PoissonBatchSampler(N, BATCH / N, generator=SEED)}
    assert len(sizes) > 3  # the logical batches really varied in size
    stats = torch._dynamo.utils.counters
    assert sum(stats["graph_break"].values()) == 0
    assert stats["stats"]["unique_graphs"] == 1  # one shape for every Poisson batch size
    assert strategy.private.speed.max_physical_batch_size == 32  # multiple of 8 above 12 + 4 sd
    assert strategy.private.ledger.steps == eager_strategy.private.ledger.steps == 2 * N // BATCH
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


class ReadsWeightInLoss(Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx).sum() + self.net[0].weight.pow(2).sum()


def test_first_step_runs_eagerly_so_the_leak_guard_still_catches_bypassed_gradients():
    strategy = lightning_dp.DPStrategy(noise_multiplier=0.5, seed=SEED, compile=True, loss_reduction="sum")
    with pytest.raises(lightning_dp.PrivacyLeakError, match=r"`net.0.weight`"):
        trainer(strategy, max_steps=2).fit(ReadsWeightInLoss(), DataLoader(toy_dataset(N), batch_size=BATCH))
