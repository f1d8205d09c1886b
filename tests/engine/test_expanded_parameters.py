"""A parameter of one row expanded or repeated to the batch (a Perceiver's latents, a pooling
head's probe, a class token) is each example's own copy, whatever consumes it. Expanded into a
child layer (the latents' own query projection) its gradient used to bypass clipping (refused
by the leak guard, even with fallback=True); repeated (SigLIP's probe) it was refused unless
fallback=True; only a concatenation (ViT's class token) was routed."""

from __future__ import annotations

import pytest
import torch
from oracle import clipped_sum, per_example_grads
from torch import nn

import lightning_dp as ldp


class Latents(nn.Module):
    """Learned queries, expanded (``expand``) or tiled (``repeat``) to the batch, projected by a
    child layer and attending over the input."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.latents = nn.Parameter(torch.randn(1, 2, 4) if how != "1-d" else torch.randn(4))
        self.query = nn.Linear(4, 4)
        self.attend = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.how == "expand":
            queries = self.latents.expand(b, -1, -1)
        elif self.how == "repeat":
            queries = self.latents.repeat(b, 1, 1)
        else:  # a 1-D parameter given leading dims
            queries = self.latents.expand(b, 3, -1)
        return self.attend(self.query(queries), x, x, need_weights=False)[0]


class Model(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.proj, self.pool = nn.Linear(5, 4), Latents(how)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.tanh(self.proj(x))).flatten(1)


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out.tanh() + 0.5 * out.pow(2)).sum()


@pytest.mark.parametrize("clipping", ["layer", "flat"])
@pytest.mark.parametrize("how", ["expand", "repeat", "1-d"])
def test_latents_expanded_to_the_batch_are_clipped_as_the_loop(how, clipping):
    torch.manual_seed(0)
    plain = Model(how).double()
    x = 2 * torch.randn(5, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = per_example_grads(plain, [x[i : i + 1] for i in range(5)], _loss)
    names = [n for n, _ in plain.named_parameters()]
    groups = {"flat": names} if clipping == "flat" else {"pool": ["pool.latents"]}
    _, norms = clipped_sum(grads, groups, dict.fromkeys(groups, 1.0))
    threshold = 0.5 * min(min(v) for v in norms.values())

    def private_sum(rows: slice) -> dict[str, torch.Tensor]:
        model = ldp.make_private(Model(how).double(), clipping=clipping, max_grad_norm=threshold)
        model.load_state_dict(plain.state_dict())
        _loss(model, x[rows]).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    full = private_sum(slice(0, 5))
    members = groups.get("flat") or groups["pool"]
    expected, _ = clipped_sum(grads, {"g": members}, {"g": threshold})
    for name in members:
        torch.testing.assert_close(full[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    without_last = private_sum(slice(0, 4))
    moved = sum(float((full[n] - without_last[n]).pow(2).sum()) for n in members) ** 0.5
    assert threshold * 0.99 < moved <= threshold * (1 + 1e-9)


def test_a_repeat_that_tiles_is_not_taken_for_a_batch_expansion():
    """``repeat`` along a dim of size > 1 tiles rows, which broadcasting does not: refused as an
    op no rule stands for (the fallback recomputes it exactly)."""

    class Tiled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = nn.Parameter(torch.randn(1, 2, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.rows.repeat(x.shape[0], 3, 1).sum(1)

    with pytest.raises(ValueError, match=r"`0` \(Tiled\) uses its parameter 'rows' in .*repeat"):
        ldp.make_private(nn.Sequential(Tiled()))(torch.randn(3, 4))
