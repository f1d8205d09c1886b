"""The norm of a shared parameter's summed per-example gradient from its uses' factors (cross
terms over token pairs) against instantiating and summing the uses, in float64."""

from __future__ import annotations

import pytest
import torch

from lightning_dp.engine import shared_norms
from lightning_dp.engine.shared_norms import norm_sq_of_sum

B, V, D = 3, 11, 4


def _ids(tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (B, tokens), generator=torch.Generator().manual_seed(seed))


def _dense(tokens: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(B, tokens, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _instantiated(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    if rows.is_floating_point():
        return torch.einsum("btp,btd->bpd", rows, cols)
    return torch.einsum("btp,btd->bpd", torch.nn.functional.one_hot(rows, V).double(), cols)


USES = {  # (rows, cols) of one use, [p=V, d=D] parameter
    "embedding": lambda seed: (_ids(5, seed), _dense(5, D, seed + 1)),
    "embedding-short": lambda seed: (_ids(1, seed), _dense(1, D, seed + 1)),
    "linear": lambda seed: (_dense(4, V, seed), _dense(4, D, seed + 1)),
}


@pytest.mark.parametrize(
    "kinds",
    [("embedding", "linear"), ("linear", "embedding"), ("embedding", "embedding-short"),
     ("linear", "linear"), ("embedding", "linear", "linear")],
    ids="+".join,
)
def test_cross_terms_equal_the_norm_of_the_instantiated_sum(kinds):
    uses = [USES[kind](10 * i) for i, kind in enumerate(kinds)]
    grads = [_instantiated(*use) for use in uses]
    want = sum(grads).pow(2).sum((1, 2))
    own = [g.pow(2).sum((1, 2)) for g in grads]
    assert not torch.allclose(want, sum(own))  # the cross terms matter here

    got = norm_sq_of_sum(own, [t for use in uses for t in use], [2] * len(uses))

    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_uses_without_factors_are_instantiated_and_summed():
    ids, g = USES["embedding"](0)
    rows, x = USES["linear"](5)
    head = _instantiated(rows, x)
    want = (_instantiated(ids, g) + head).pow(2).sum((1, 2))
    got = norm_sq_of_sum([torch.zeros(B), head.pow(2).sum((1, 2))], [ids, g, head], [2, 1])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_long_sequences_of_a_small_layer_instantiate_instead(monkeypatch):
    """T*T' Gram products against p*d per token: at T = 64 and p = d = 2 instantiating is
    cheaper, and gives the same norm."""
    a = (_dense(64, 2, 1), _dense(64, 2, 2))
    b = (_dense(64, 2, 3), _dense(64, 2, 4))
    assert not shared_norms._cross_terms_are_cheaper([list(a), list(b)])
    calls = []
    monkeypatch.setattr(shared_norms, "_cross", lambda *args: calls.append(args))
    want = (_instantiated(*a) + _instantiated(*b)).pow(2).sum((1, 2))
    got = norm_sq_of_sum([_instantiated(*a).pow(2).sum((1, 2)), _instantiated(*b).pow(2).sum((1, 2))],
                         [*a, *b], [2, 2])
    assert not calls
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
