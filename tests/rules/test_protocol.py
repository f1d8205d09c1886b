"""What the engine clips from: a use's per-example norms, whichever of ``norm`` and ``norm_sq``
its rule implements, and a group's norm from its parameters' norms."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dp.engine.clipper import group_norm
from lightning_dp.rules.protocol import GradUse


class _Instantiated(GradUse):
    """A rule that only gives per-example gradients."""

    def __init__(self, grads: torch.Tensor) -> None:
        super().__init__({"weight": torch.zeros(grads.shape[1:])}, grads.shape[0])
        self.grads = grads

    def per_example(self, name: str) -> torch.Tensor:
        return self.grads


class _OwnSquaredNorms(GradUse):
    """A rule with its own squared norms (as ghost norms are) and no per-example gradients."""

    def __init__(self, norm_sq: torch.Tensor) -> None:
        super().__init__({"weight": torch.zeros(())}, norm_sq.shape[0])
        self._norm_sq = norm_sq

    def norm_sq(self, name: str) -> torch.Tensor:
        return self._norm_sq

    def per_example(self, name: str) -> torch.Tensor:
        raise AssertionError("the norm of a use with its own norm_sq must not instantiate")


def _by_hand(grads: torch.Tensor) -> list[float]:
    return [math.sqrt(sum(float(v) ** 2 for v in row.double().flatten())) for row in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_use_with_only_per_example_gradients_has_norms_from_them(dtype):
    grads = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    use = _Instantiated(grads)
    norms = use.norm("weight")
    assert norms.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(norms.double(), torch.tensor(_by_hand(grads), dtype=torch.float64))
    torch.testing.assert_close(use.norm_sq("weight"), norms.square())


def test_a_use_with_its_own_squared_norms_is_not_instantiated_for_its_norm():
    use = _OwnSquaredNorms(torch.tensor([4.0, 0.0, 2.25]))
    torch.testing.assert_close(use.norm("weight"), torch.tensor([2.0, 0.0, 1.5]))


@pytest.mark.parametrize("parameters", [1, 2, 3])
def test_a_group_norm_is_the_root_of_its_parameters_summed_squares(parameters):
    gen = torch.Generator().manual_seed(parameters)
    norms = [torch.rand(6, generator=gen) * 10 for _ in range(parameters)]
    expected = [math.sqrt(sum(float(n[i]) ** 2 for n in norms)) for i in range(6)]
    torch.testing.assert_close(group_norm(norms).double(), torch.tensor(expected, dtype=torch.float64))


def test_a_group_norm_promotes_dtypes_and_keeps_non_finite_rows_non_finite():
    """A float64 parameter beside a float32 one is summed in float64 (as ``a + b`` was). A row
    with a NaN or infinite norm in any parameter stays non-finite, so its clip factor is 0."""
    a = torch.tensor([3.0, float("nan"), 1.0, 0.0])
    b = torch.tensor([4.0, 1.0, float("inf"), 0.0], dtype=torch.float64)
    for norms in ([a, b], [a, b, torch.ones(4)]):
        total = group_norm(norms)
        assert total.dtype == torch.float64
        assert total[0] == pytest.approx(math.sqrt(25.0 + (len(norms) - 2)))
        assert not torch.isfinite(total[1]) and not torch.isfinite(total[2])
        assert torch.isfinite(total[3])
