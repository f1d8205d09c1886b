"""Registry behaviour and a contract test over every registered rule."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import clipped_sum, median_threshold, per_example_grads
from torch import nn

import lightning_dp as ldp
from lightning_dp.engine import clipper_of
from lightning_dp.rules import Rule, RuleRegistry, rules
from lightning_dp.rules.linear import LinearRule

# One instance and input per registered type: registering a rule without a contract case fails.
FACTORIES = {
    "Linear": (lambda: nn.Linear(4, 3), lambda b: torch.randn(b, 2, 4)),
    "Embedding": (lambda: nn.Embedding(7, 3), lambda b: torch.randint(0, 7, (b, 5))),
    "Conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), lambda b: torch.randn(b, 2, 6)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3, stride=2), lambda b: torch.randn(b, 2, 6, 5)),
    "Conv3d": (lambda: nn.Conv3d(2, 2, 2), lambda b: torch.randn(b, 2, 3, 3, 3)),
    "LayerNorm": (lambda: nn.LayerNorm(4), lambda b: torch.randn(b, 3, 4)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), lambda b: torch.randn(b, 4, 5)),
    "RMSNorm": (lambda: nn.RMSNorm(4), lambda b: torch.randn(b, 3, 4)),
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(3, affine=True), lambda b: torch.randn(b, 3, 5)),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(3, affine=True), lambda b: torch.randn(b, 3, 4, 4)),
    "InstanceNorm3d": (lambda: nn.InstanceNorm3d(2, affine=True), lambda b: torch.randn(b, 2, 3, 3, 3)),
    "MultiheadAttention": (
        lambda: _SelfAttention(nn.MultiheadAttention(4, 2, batch_first=True)),
        lambda b: torch.randn(b, 3, 4),
    ),
    "Conv1D": (lambda: _gpt2_conv1d(), lambda b: torch.randn(b, 3, 4)),
    "LSTM": (lambda: _Outputs(nn.LSTM(4, 3, batch_first=True)), lambda b: torch.randn(b, 3, 4)),
    "GRU": (lambda: _Outputs(nn.GRU(4, 3, batch_first=True)), lambda b: torch.randn(b, 3, 4)),
    "RNN": (lambda: _Outputs(nn.RNN(4, 3, batch_first=True)), lambda b: torch.randn(b, 3, 4)),
}


class _Outputs(nn.Module):
    """A recurrent layer's outputs and final states, batch first (examples along dim 0)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        out, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return out.sum(1) + h.transpose(0, 1).sum(1)


class _SelfAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def _gpt2_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(5, 4)


@pytest.mark.parametrize("type_name", rules.registered_types())
def test_every_registered_rule_matches_the_loop(type_name):
    assert type_name in FACTORIES, f"add a contract case for the new rule of {type_name}"
    build, batch = FACTORIES[type_name]
    torch.manual_seed(0)
    model, x = build().double(), batch(4)
    x = x.double() if x.is_floating_point() else x
    loss = lambda m, inp: (m(inp).sin() + m(inp).pow(2)).sum()  # noqa: E731
    grads = per_example_grads(model, [x[i : i + 1] for i in range(4)], loss)
    private = ldp.make_private(copy.deepcopy(model), clipping="flat")
    members = [n for n, p in model.named_parameters() if p.requires_grad]
    threshold = median_threshold(grads, members)
    clipper_of(private).groups["flat"].threshold = threshold
    loss(private, x).backward()
    expected, norms = clipped_sum(grads, {"flat": members}, {"flat": threshold})
    assert max(norms["flat"]) > threshold
    for name, p in private.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-10, msg=name)


def test_lookup_follows_the_mro_so_subclasses_are_covered():
    class MyLinear(nn.Linear):
        pass

    assert isinstance(rules.lookup(MyLinear(2, 2)), LinearRule)
    assert rules.lookup(nn.ReLU()) is None


def test_duplicate_registration_raises_with_override_hint():
    registry = RuleRegistry()
    registry.register(nn.Linear)(LinearRule)
    with pytest.raises(ValueError, match="override=True"):
        registry.register(nn.Linear)(Rule)
    registry.register(nn.Linear, override=True)(Rule)
    assert type(registry.lookup(nn.Linear(1, 1))) is Rule
