"""The first-step self-check: passes every zoo model, refuses planted mis-mapping and losses
that mix examples, and leaves the model as it found it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from dp_fixtures import flat_params, toy_dataset, trainer
from torch import nn
from torch.utils.data import DataLoader
from zoo import ZOO, available, build

import lightning_dp as ldp
from lightning_dp.engine.self_check import checked_rows

ZOO_CASES = [
    pytest.param(c, id=c.name, marks=pytest.mark.skipif(not available(c), reason=f"needs {c.needs}"))
    for c in ZOO if c.refused is None
]


@pytest.mark.parametrize("case", ZOO_CASES)
def test_passes_every_zoo_model(case):
    model, batch = build(case)
    private = ldp.make_private(model, fallback=case.fallback)
    report = ldp.self_check(private, case.loss, batch, num_examples=3)
    assert report.examples == 3 and report.engine.keys() == report.reference.keys()


class RowPositions(nn.Module):
    """Planted bug: position ids with no batch dim and as many rows as the batch has examples
    (T == B), added by broadcasting. The example-count guard cannot tell them from examples."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.tok = nn.Linear(4, 6)
        self.pos = nn.Embedding(seq, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        positions = self.pos(torch.arange(x.shape[1]))  # [T, d], not [B, T, d]
        return self.head(torch.tanh(self.tok(x) + positions))


def _mixed(model, x):
    out = model(x)
    return (out.tanh() + 0.5 * out.pow(2)).sum()


def test_refuses_a_planted_mis_mapped_module_naming_its_group():
    torch.manual_seed(0)
    model = ldp.make_private(RowPositions(seq=4).double())
    x = torch.randn(4, 4, 4, dtype=torch.float64)  # B == T == 4
    with pytest.raises(ldp.SelfCheckError, match=r"'pos'"):
        ldp.self_check(model, _mixed, x)


def test_refuses_a_loss_that_mixes_examples():
    torch.manual_seed(0)
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.tensor([1.0, 1, 0, 1, 1, 1], dtype=torch.float64)

    def masked_mean(m, batch):  # divides by a count over the whole batch
        xb, yb, mb = batch
        losses = F.cross_entropy(m(xb), yb, reduction="none")
        return (losses * mb).sum() / mb.sum() * xb.shape[0]

    with pytest.raises(ldp.SelfCheckError, match="mixes examples"):
        ldp.self_check(model, masked_mean, (x, y, mask))
    per_example = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none") * b[2]
    ldp.self_check(model, per_example, (x, y, mask))  # the per-example form passes


def test_checks_examples_spread_over_the_batch():
    assert checked_rows(10, 3) == [0, 4, 9]  # 4.5 rounds half to even
    assert checked_rows(2, 3) == [0, 1]
    assert checked_rows(7, 1) == [0]


def test_refuses_a_loss_of_the_hardest_examples_in_a_batch_sorted_hardest_first():
    """Online hard-example mining written per example: only the batch's 3 largest losses train.
    With the hardest examples first, the first three look right alone (a probe measured 1.6 C
    for the released sum); the last example trains alone but not in the batch."""
    torch.manual_seed(0)
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with torch.no_grad():
        order = F.cross_entropy(model(x), y, reduction="none").argsort(descending=True)
    x, y = x[order], y[order]

    def hardest_three(m, batch):
        losses = F.cross_entropy(m(batch[0]), batch[1], reduction="none")
        return losses * (losses >= losses.detach().topk(min(3, len(losses))).values[-1])

    with pytest.raises(ldp.SelfCheckError, match=r"example 7: engine 0, single-example pass"):
        ldp.self_check(model, hardest_three, (x, y))  # rows 0, 4 and 7


def test_a_layer_the_loss_freezes_is_left_out_of_both_passes():
    """Freezing inside training_step (at the first step, where the check runs): the frozen
    layer gets no gradient in either pass, instead of autograd's bare error."""
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))

    def freezing(m, x):
        m[0].requires_grad_(False)
        return m(x).pow(2).sum(1)

    report = ldp.self_check(model, freezing, torch.randn(5, 4))
    assert "0" not in report.engine and report.reference["0"] == [0.0, 0.0, 0.0]
    assert min(report.reference["2"]) > 0


def test_leaves_gradients_counts_and_modes_as_they_were():
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)))
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    ldp.self_check(model, lambda m, x: m(x).pow(2).sum(1), torch.randn(5, 4))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


class Positions(L.LightningModule):
    """Through the Trainer: the planted module is refused before any step is released."""

    def __init__(self) -> None:
        super().__init__()
        self.net = RowPositions(seq=3)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).sum(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_refuses_a_mis_mapped_model_before_the_first_release():
    torch.manual_seed(0)
    model = Positions()
    before = flat_params(model).clone()
    data = torch.utils.data.TensorDataset(torch.randn(30, 3, 4))
    strategy = ldp.DPStrategy(noise_multiplier=1.0, seed=0, poisson=False)
    with pytest.raises(ldp.SelfCheckError):
        trainer(strategy, max_steps=2).fit(model, DataLoader(data, batch_size=3))
    assert strategy.private.ledger.steps == 0
    assert torch.equal(flat_params(model), before)
    # the same model, checked off, trains (the check is what stops it)
    trainer(ldp.DPStrategy(noise_multiplier=1.0, seed=0, self_check=False, poisson=False), max_steps=1).fit(
        Positions(), DataLoader(data, batch_size=3)
    )


class Backbone(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.backbone.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)) * 50.0, y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class UnfreezeAndWatch(L.Callback):
    """Unfreeze the backbone at step 2 (as BackboneFinetuning does between steps) and record
    each step's realised batch size and the backbone's summed gradient norm."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 2:
            module.backbone.requires_grad_(True)
        self.size = batch[0].shape[0]

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grad = module.backbone[0].weight.grad
        if grad is not None:
            q_n = trainer.strategy.private.expected_batch_size
            self.steps.append((self.size, float(grad.norm()) * q_n))


def test_a_layer_unfrozen_after_setup_is_clipped_from_its_first_step():
    torch.manual_seed(0)
    model, watch = Backbone(), UnfreezeAndWatch()
    strategy = ldp.DPStrategy(noise_multiplier=0.0, max_grad_norm=0.01, seed=0)
    trainer(strategy, [watch], max_steps=6).fit(model, DataLoader(toy_dataset(96), batch_size=16))
    assert len(watch.steps) == 4  # steps 2..5 trained the backbone
    assert "backbone.0" in ldp.group_thresholds(model)
    for size, summed_norm in watch.steps:  # sigma 0: the sum of clipped gradients, <= B * C
        assert summed_norm <= size * 0.01 * (1 + 1e-5)
    assert max(norm for _, norm in watch.steps) > 0.5 * 0.01  # the layer really trained
