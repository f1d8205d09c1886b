"""A private module's output modified in place, as plain modules allow (``h = layer(x); h += r``,
Falcon's ``mlp_output += attention_output``): no error, and the clipped sum still equals the
loop's of single-example gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import clipped_sum, median_threshold, per_example_grads
from torch import nn

import lightning_dp as ldp
from lightning_dp.engine import clipper_of
from lightning_dp.engine.make_private import _state
from lightning_dp.rules.func_fallback import FuncFallbackRule


class Tanh2(nn.Module):
    """A parameter in an op no rule stands for (``einsum``): the torch.func fallback computes
    the module, and its output tap hands the output on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.einsum("...d,de->...e", x, self.w)) * 2


LAYERS = {
    "linear 3-d": lambda: nn.Linear(6, 6),
    "linear 2-d": lambda: nn.Linear(6, 6),
    "layer norm": lambda: nn.LayerNorm(6),
    "rms norm": lambda: nn.RMSNorm(6),
    "group norm": lambda: nn.GroupNorm(2, 6),
    "conv1d": lambda: nn.Conv1d(6, 6, 3, padding=1),
    "fallback": Tanh2,
}


class InPlace(nn.Module):
    """``layer``, its output changed in place twice (an add of another tensor, then a scale),
    then a head (over dim 1 for channels-first layers)."""

    def __init__(self, layer: nn.Module, channels_first: bool) -> None:
        super().__init__()
        self.layer, self.head, self.channels_first = layer, nn.Linear(6, 2), channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        h += x.square()
        h.mul_(1.5)
        return self.head(h.transpose(1, 2) if self.channels_first else h)


CHANNELS_FIRST = ("group norm", "conv1d")


def _inputs(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "linear 2-d":
        return torch.randn(5, 6, generator=gen, dtype=torch.float64)
    if kind in CHANNELS_FIRST:
        return torch.randn(5, 6, 4, generator=gen, dtype=torch.float64)
    return torch.randn(5, 4, 6, generator=gen, dtype=torch.float64)


def _check_against_loop(model: nn.Module, batch: torch.Tensor, clipping: str, fallback: bool) -> None:
    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x).square().sum()

    private = ldp.make_private(copy.deepcopy(model), clipping=clipping, fallback=fallback)
    clipper = clipper_of(private)
    loss(private, batch).backward()  # the first call picks the fallback where one is needed
    private.zero_grad(set_to_none=True)
    if fallback:
        assert any(isinstance(site.rule, FuncFallbackRule) for site in _state(private).sites)
    groups = {name: g.params for name, g in clipper.groups.items()}
    grads = per_example_grads(model, list(batch.unsqueeze(1)), loss)
    thresholds = {g: median_threshold(grads, members) for g, members in groups.items()}
    for name, threshold in thresholds.items():
        clipper.groups[name].threshold = threshold
    loss(private, batch).backward()
    expected, norms = clipped_sum(grads, groups, thresholds)
    assert any(n > thresholds[g] for g, values in norms.items() for n in values)
    for name, param in private.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("clipping", ["layer", "flat"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_an_output_changed_in_place_is_clipped_as_the_loop(kind, clipping):
    torch.manual_seed(0)
    model = InPlace(LAYERS[kind](), channels_first=kind in CHANNELS_FIRST).double()
    batch = _inputs(kind)
    _check_against_loop(model, batch, clipping, fallback=kind == "fallback")


@pytest.mark.parametrize("clipping", ["layer", "flat"])
def test_an_embedding_output_changed_in_place_is_clipped_as_the_loop(clipping):
    torch.manual_seed(0)

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(9, 6), nn.Linear(6, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids)
            h *= 2.0  # scaled embeddings written in place
            return self.head(h)

    model = Embed().double()
    ids = torch.randint(9, (5, 4), generator=torch.Generator().manual_seed(2))
    _check_against_loop(model, ids, clipping, fallback=False)
