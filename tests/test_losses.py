"""Per-example sequence loss: each example's gradient is its own, so removing one example moves
the clipped sum by at most C; the batch-wide token mean it replaces moves it by more."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_dp
from lightning_dp.losses import sequence_cross_entropy
from lightning_dp.strategies.loss import summed_loss

V, T, D = 11, 6, 8


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.head = nn.Linear(D, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows and next-token targets, -100 past each row's length."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (len(lengths), T), generator=g)
    targets = torch.randint(0, V, (len(lengths), T), generator=g)
    for row, length in enumerate(lengths):
        tokens[row, length:] = 0
        targets[row, length:] = -100
    return tokens, targets


def per_example_loss(model, tokens, targets):
    return sequence_cross_entropy(model(tokens), targets, ignore_index=-100).sum()


def batch_token_mean(model, tokens, targets):
    """The padded-LM default, read as the strategies read a scalar mean: B x the mean."""
    loss = F.cross_entropy(model(tokens).view(-1, V), targets.view(-1), ignore_index=-100)
    return loss * len(tokens)


def test_matches_a_loop_over_sequences():
    torch.manual_seed(0)
    logits = torch.randn(3, T, V, dtype=torch.float64)
    _, targets = padded_batch([6, 2, 0])
    weight = torch.rand(V, dtype=torch.float64) + 0.5
    got = sequence_cross_entropy(logits, targets, weight=weight)
    for i in range(2):
        valid = targets[i] != -100
        want = F.cross_entropy(logits[i][valid], targets[i][valid], weight=weight)
        torch.testing.assert_close(got[i], want)
    assert got[2] == 0  # no valid token: no loss, no gradient
    assert got.shape == (3,)
    assert sequence_cross_entropy(logits[:0], targets[:0]).shape == (0,)
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        sequence_cross_entropy(logits.transpose(1, 2), targets)


def _clipped_sums(model, loss_fn, tokens, targets, threshold):
    """The summed clipped gradient of the batch and of each leave-one-out batch, and the
    per-example norms seen, with flat clipping at ``threshold`` (no noise)."""
    sums, norms = [], []
    for drop in [None, *range(len(tokens))]:
        keep = [i for i in range(len(tokens)) if i != drop]
        private = lightning_dp.make_private(copy.deepcopy(model), clipping="flat", max_grad_norm=threshold)
        loss_fn(private, tokens[keep], targets[keep]).backward()
        sums.append(torch.cat([p.grad.flatten() for p in private.parameters()]))
        norms.append(lightning_dp.group_norms(private)["flat"])
    return sums, torch.cat(norms)


@pytest.mark.parametrize("loss_fn, private", [(per_example_loss, True), (batch_token_mean, False)],
                         ids=["sequence_cross_entropy", "batch_token_mean"])
def test_removing_one_example_moves_the_clipped_sum_by_at_most_c(loss_fn, private):
    torch.manual_seed(0)
    model = TinyLM().double()
    # one long sequence among identical short ones (their gradients add up when rescaled)
    tokens, targets = padded_batch([6, 1, 1, 1, 1])
    tokens[2:], targets[2:] = tokens[1], targets[1]
    _, norms = _clipped_sums(model, loss_fn, tokens, targets, threshold=1e6)
    c = 1.01 * norms.max().item()  # just above every per-example norm, in every batch
    sums, norms = _clipped_sums(model, loss_fn, tokens, targets, threshold=c)
    assert norms.max() < c  # clipping is active but binds nowhere: sigma 0, the sum as released
    moved = max((sums[0] - without).norm().item() for without in sums[1:])
    if private:
        assert moved <= c * (1 + 1e-9)
    else:  # negative control: the batch-wide mean lets one example move everyone's gradient
        assert moved > 1.5 * c


def test_the_strategies_refuse_the_batch_token_mean_and_accept_the_helper():
    model = TinyLM()
    tokens, targets = padded_batch([6, 1, 3])
    loss = F.cross_entropy(model(tokens).view(-1, V), targets.view(-1), ignore_index=-100)
    for reduction in ("auto", "mean", "sum"):
        with pytest.raises(ValueError, match=r"ignore_index=-100.*lightning_dp\.losses\.sequence_cross_entropy"):
            summed_loss(loss, 3, reduction)
    per_example = sequence_cross_entropy(model(tokens), targets)
    torch.testing.assert_close(summed_loss(per_example.mean(), 3, "auto"), per_example.sum())


@pytest.mark.parametrize("make_loss, words", [
    (lambda x, y, m: F.cross_entropy(x, y, weight=torch.tensor([1.0, 2.0, 3.0])), "class `weight`"),
    (lambda x, y, m: (F.cross_entropy(x, y, reduction="none") * m).sum() / m.sum(), "divided by 3.0"),
    (lambda x, y, m: F.cross_entropy(x, y, reduction="none")[m.bool()].mean(), "selected by a mask"),
])
def test_other_batch_dependent_means_are_refused(make_loss, words):
    x = torch.randn(4, 3, requires_grad=True)
    y, m = torch.tensor([0, 1, 2, 1]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=words):
        summed_loss(make_loss(x, y, m), 4, "mean")


@pytest.mark.parametrize("make_loss, reduction", [
    (lambda x, y: F.cross_entropy(x, y), "mean"),
    (lambda x, y: F.cross_entropy(x, y, weight=torch.ones(3)), "mean"),
    (lambda x, y: F.cross_entropy(x, y, ignore_index=-100), "mean"),  # nothing ignored here
    (lambda x, y: F.cross_entropy(x, y, reduction="sum"), "sum"),
    (lambda x, y: F.cross_entropy(x, y, reduction="none").sum() / 4, "mean"),
])
def test_plain_sums_and_means_pass(make_loss, reduction):
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    want = F.cross_entropy(x, y, reduction="sum")
    torch.testing.assert_close(summed_loss(make_loss(x, y), 4, reduction), want)
