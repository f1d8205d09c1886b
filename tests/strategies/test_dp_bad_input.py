"""Bad input gives one clear error before training starts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dp_fixtures import Classifier, toy_dataset, trainer
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Subset,
    default_collate,
)

import lightning_dp
from lightning_dp.strategies.poisson_loader import ExampleRowsCollate, fixed_batches_rate


class Unsized(Dataset):
    def __getitem__(self, i):
        return torch.randn(8), 0


class Stream(IterableDataset):
    def __iter__(self):
        yield from ((torch.randn(8), 0) for _ in range(10))


def _fit(model=None, loader=None, strategy=None, callbacks=(), **kwargs):
    model = model or Classifier()
    loader = loader if loader is not None else DataLoader(toy_dataset(), batch_size=8)
    strategy = strategy or lightning_dp.DPStrategy(noise_multiplier=1.0)
    t = trainer(strategy, callbacks=callbacks, **kwargs)
    t.fit(model, loader)
    return t


def _untouched(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(model=Classifier(norm="batch")), r"`net.1` is a BatchNorm1d.*GroupNorm or LayerNorm"),
        (dict(callbacks=[lightning_dp.PrivacyAccountant(target_epsilon=1e-6, delta=1e-8)],
              strategy=lightning_dp.DPStrategy()), r"target_epsilon.*searched"),
        (dict(callbacks=[lightning_dp.PrivacyAccountant(delta=0.5)]), r"delta=0.5 is not below 1/N"),
        (dict(loader=DataLoader(Unsized(), batch_size=4)), r"has no __len__"),
        (dict(loader=DataLoader(Stream(), batch_size=4)), r"IterableDataset"),
        (dict(accumulate_grad_batches=2), r"accumulate_grad_batches=2"),
        (dict(strategy=lightning_dp.DPStrategy()), r"no noise multiplier"),
    ],
)
def test_one_clear_error_before_training(kwargs, match):
    model = kwargs.pop("model", None) or Classifier()
    before = _untouched(model)
    with pytest.raises(ValueError, match=match):
        _fit(model=model, max_epochs=2, **kwargs)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q), "parameters changed before the error"


def test_batch_sampler_without_batch_size_is_refused():
    data = toy_dataset()
    loader = DataLoader(data, batch_sampler=[[0, 1, 2]] * 3)
    with pytest.raises(ValueError, match=r"no batch_size"):
        _fit(loader=loader)


def test_fp16_loss_scaling_is_refused():
    """On CPU Lightning turns 16-mixed into bf16; on CUDA the GradScaler must be refused."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_dp.strategies.dp import check_trainer_supports_dp

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    strategy = SimpleNamespace(precision_plugin=plugin, lightning_module=Classifier(),
                               private=SimpleNamespace(privacy=SimpleNamespace(noise_multiplier=1.0)))
    with pytest.raises(ValueError, match=r"bf16-mixed"):
        check_trainer_supports_dp(SimpleNamespace(accumulate_grad_batches=1, callbacks=[]), strategy)


class MeanDeclaredSum(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)  # a mean over the batch


def test_mean_loss_declared_as_sum_is_caught():
    with pytest.raises(ValueError, match=r"loss_reduction='sum'.*mean over the batch"):
        _fit(model=MeanDeclaredSum(), strategy=lightning_dp.DPStrategy(noise_multiplier=1.0, loss_reduction="sum"))


class Opaque(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self(x) - 1).abs().max()


def test_undetectable_scalar_reduction_asks_for_per_example_losses():
    with pytest.raises(ValueError, match=r"cannot tell whether.*reduction='none'"):
        _fit(model=Opaque())


class Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx).sum()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_is_refused():
    with pytest.raises(ValueError, match=r"automatic optimization only"):
        _fit(model=Manual())


class TwoDatasets(Classifier):
    """One forward per loader, the two per-example losses added row by row."""

    def training_step(self, batch, batch_idx):
        (xa, ya), (xb, yb) = batch.values() if isinstance(batch, dict) else batch
        return F.cross_entropy(self(xa), ya, reduction="none") + F.cross_entropy(self(xb), yb, reduction="none")


@pytest.mark.parametrize("poisson", [True, False])
@pytest.mark.parametrize("combine", [list, lambda loaders: dict(zip("ab", loaders))], ids=["list", "dict"])
def test_several_train_loaders_are_refused(poisson, combine):
    """Row i of each loader's batch would be clipped as one example: removing one example of a
    loader re-pairs every later row (a probe measured 1.15 C)."""
    model = TwoDatasets()
    before = _untouched(model)
    loaders = [DataLoader(toy_dataset(16, seed=s), batch_size=8) for s in (1, 2)]
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, poisson=poisson)
    with pytest.raises(ValueError, match=r"one training DataLoader, but fit was given 2.*ConcatDataset"):
        _fit(model, combine(loaders), strategy, max_steps=1)
    assert strategy.private.ledger.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class Keyed(Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch["only"], batch_idx)


def test_one_train_loader_in_a_dict_trains():
    t = _fit(Keyed(), {"only": DataLoader(toy_dataset(), batch_size=8)}, max_steps=2)
    assert t.strategy.private.ledger.steps == 2


class SkipsBatches(Classifier):
    def training_step(self, batch, batch_idx):
        return None  # Lightning's "skip this batch"


def test_skipping_a_batch_is_refused_saying_why():
    model = SkipsBatches()
    before = _untouched(model)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0)
    with pytest.raises(TypeError, match=r"returned None.*cannot be skipped.*Poisson sampling.*loss 0"):
        _fit(model, strategy=strategy, max_steps=1)
    assert strategy.private.ledger.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _loader_on(world_size: int, n: int, drop_last: bool = False, distributed: bool = True) -> DataLoader:
    sampler = DistributedSampler(toy_dataset(n), num_replicas=world_size, rank=0, shuffle=False,
                                 drop_last=drop_last) if distributed else None
    return DataLoader(toy_dataset(n), batch_size=2, sampler=sampler)


def test_fixed_batches_on_several_devices_repeat_no_example():
    """poisson=False under dp_fsdp: Lightning's DistributedSampler pads N=7 over 2 ranks by
    repeating an example, which a probe saw released twice in one step (1.4 S leave-one-out)."""
    with pytest.raises(ValueError, match=r"poisson=False on 2 devices with N=7.*repeating 1 example"):
        fixed_batches_rate(_loader_on(2, 7), 7, 2)
    with pytest.raises(ValueError, match=r"sampler is SequentialSampler: every device would see the same examples"):
        fixed_batches_rate(_loader_on(2, 8, distributed=False), 8, 2)
    # the logical batch is every device's batch: the expected batch size divides their sum
    assert fixed_batches_rate(_loader_on(2, 8), 8, 2) == 0.5
    assert fixed_batches_rate(_loader_on(2, 7, drop_last=True), 7, 2) == 4 / 7
    assert fixed_batches_rate(_loader_on(1, 7, distributed=False), 7, 1) == 2 / 7


def _two_views(examples):
    """SimCLR-style: every example twice (the second view jittered), as 2B rows."""
    x, y = default_collate(examples)
    return torch.cat([x, x + 0.1]), torch.cat([y, y])


def _token_budget(examples):
    """Drops the examples past a budget, decided by the whole batch."""
    x, y = default_collate(examples)
    keep = max(1, len(examples) - 2)
    return x[:keep], y[:keep]


def _time_major(examples):
    """``pad_sequence``'s default layout: [T, B, ...], time first."""
    x, y = default_collate(examples)
    return x[:, :3].t().unsqueeze(-1).expand(-1, -1, 8).contiguous(), y  # T = 3 steps


class ReleasedSum(Classifier):
    """Keeps the step's summed clipped gradient: the release times q N (q = 1 here)."""

    def on_before_optimizer_step(self, optimizer):
        n = len(self.trainer.train_dataloader.dataset)
        self.released = torch.cat([p.grad.flatten() * n for p in self.parameters()])


def _released_sum(n: int, collate) -> torch.Tensor:
    torch.manual_seed(0)
    model = ReleasedSum()
    with pytest.warns(UserWarning, match="NOT differentially private"):
        strategy = lightning_dp.DPStrategy(noise_multiplier=0.0, max_grad_norm=1e-3, clipping="flat", seed=0)
    _fit(model, DataLoader(Subset(toy_dataset(16), range(n)), batch_size=16, collate_fn=collate),
         strategy, max_steps=1)
    return model.released


@pytest.mark.parametrize("collate", [_two_views, _token_budget, _time_major], ids=["two-views", "token-budget", "time-major"])
def test_a_collate_fn_whose_rows_are_not_the_sampled_examples_is_refused(collate):
    """Every row is clipped as one example: two views per example give each example two
    budgets, a batch-dependent drop or a time-major layout give rows that are not examples (a
    probe measured up to 4.4 C leave-one-out). Refused at the first batch, before any release
    (the seed draws a first Poisson batch of other than 3 examples, the time-major rows)."""
    model = Classifier()
    before = _untouched(model)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match=r"collate_fn turned \d+ sampled examples into a batch of \d+ rows"):
        _fit(model, DataLoader(toy_dataset(32), batch_size=8, collate_fn=collate), strategy, max_steps=1)
    assert strategy.private.ledger.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_two_views_per_example_leak_without_the_check(monkeypatch):
    """The DP property behind the refusal: with the row check switched off, leaving example 15
    out moves the summed clipped gradient by nearly 2 C (its two rows); one row per example
    moves it by at most C."""
    threshold = 1e-3
    moved = float((_released_sum(16, default_collate) - _released_sum(15, default_collate)).norm())
    assert 0.5 * threshold < moved <= threshold * (1 + 1e-6)
    monkeypatch.setattr(ExampleRowsCollate, "__call__", lambda self, examples: self.collate_fn(examples))
    moved = float((_released_sum(16, _two_views) - _released_sum(15, _two_views)).norm())
    assert moved > 1.5 * threshold


def test_a_batch_mapping_pytree_cannot_flatten_becomes_a_dict():
    """HF collators return a ``BatchEncoding`` (a ``UserDict``), in which lightning-dp found no
    tensor ("found no tensor with a batch dimension"): it is handed on as a dict, the empty
    Poisson batch included."""
    from collections import UserDict

    examples = [{"input_ids": torch.arange(4) + i, "labels": torch.tensor(i)} for i in range(3)]
    collate = ExampleRowsCollate(lambda rows: UserDict(default_collate(rows)), examples)
    batch = collate(examples)
    assert type(batch) is dict and batch["input_ids"].shape == (3, 4)
    empty = collate([])
    assert type(empty) is dict and empty["input_ids"].shape == (0, 4)
