"""Logical-batch split, fixed-shape padding with masks, and masked loss sums."""

from collections import namedtuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_dp.data import MicroBatch, masked_sum, pad_batch, split_logical_batch

Pair = namedtuple("Pair", ["x", "y"])


@given(indices=st.lists(st.integers(0, 10**6), max_size=40), size=st.integers(1, 9),
       pad=st.booleans())
def test_split_preserves_order_and_bounds_size(indices, size, pad):
    micro = split_logical_batch(indices, size, pad=pad, pad_index=-1)
    real = [i for mb in micro for i, keep in zip(mb.indices, mb.mask.tolist()) if keep]
    assert real == indices
    for mb in micro:
        assert mb.mask.dtype == torch.bool and len(mb.mask) == len(mb.indices)
        assert len(mb.indices) == size if pad else 1 <= len(mb.indices) <= size
        assert mb.num_real == int(mb.mask.sum())
        assert all(i == -1 for i, keep in zip(mb.indices, mb.mask.tolist()) if not keep)
    # Only the last micro-batch may be partial; padding sits at its end.
    assert all(mb.num_real == size for mb in micro[:-1])
    if micro:
        assert micro[-1].mask.tolist() == sorted(micro[-1].mask.tolist(), reverse=True)


def test_split_example():
    micro = split_logical_batch([7, 3, 9, 1, 4], 2, pad=True)
    assert [mb.indices for mb in micro] == [[7, 3], [9, 1], [4, 0]]
    assert micro[-1].mask.tolist() == [True, False]
    assert [mb.indices for mb in split_logical_batch([7, 3, 9], 2)] == [[7, 3], [9]]


def test_empty_logical_batch():
    assert split_logical_batch([], 4) == []
    (only,) = split_logical_batch([], 4, pad=True)
    assert isinstance(only, MicroBatch)
    assert only.indices == [0, 0, 0, 0] and not only.mask.any() and only.num_real == 0


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_split_rejects_bad_size(size):
    with pytest.raises(ValueError, match="`max_physical_batch_size`"):
        split_logical_batch([1, 2], size)


def test_pad_nested_collated_batch():
    batch = {
        "x": torch.arange(6.0).view(3, 2),
        "pair": Pair(torch.tensor([1, 2, 3]), [torch.ones(3, 2, 2, dtype=torch.bool)]),
        "tuple": (torch.tensor([4, 5, 6]),),
        "names": "not a tensor",
    }
    padded, mask = pad_batch(batch, 5, fill_value=0)
    assert mask.tolist() == [True, True, True, False, False]
    assert padded["x"].shape == (5, 2) and torch.equal(padded["x"][:3], batch["x"])
    assert torch.equal(padded["x"][3:], torch.zeros(2, 2))
    assert isinstance(padded["pair"], Pair)
    assert padded["pair"].x.tolist() == [1, 2, 3, 0, 0]
    assert padded["pair"].y[0].shape == (5, 2, 2) and not padded["pair"].y[0][3:].any()
    assert isinstance(padded["tuple"], tuple) and padded["tuple"][0].tolist() == [4, 5, 6, 0, 0]
    assert padded["names"] == "not a tensor"
    assert padded["x"].dtype == batch["x"].dtype


def test_pad_empty_and_full_batches():
    padded, mask = pad_batch((torch.empty(0, 3),), 4)
    assert padded[0].shape == (4, 3) and not mask.any()
    padded, mask = pad_batch(torch.ones(4, 3), 4)
    assert torch.equal(padded, torch.ones(4, 3)) and mask.all()


@pytest.mark.parametrize(
    ("batch", "size", "match"),
    [
        ({"x": torch.ones(3, 2), "y": torch.ones(2)}, 4, r"`batch\['y'\]`=2"),
        (torch.ones(5, 2), 4, "`size`=4"),
        ((torch.tensor(1.0),), 4, r"`batch\[0\]`"),
        ({"names": ["a", "b"]}, 4, "no tensors"),
    ],
)
def test_pad_rejects_bad_batches(batch, size, match):
    with pytest.raises(ValueError, match=match):
        pad_batch(batch, size)


def test_masked_sum_gives_padded_rows_exactly_zero_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(3, 3)
    xp, mask = pad_batch(x, 5, fill_value=1e30)  # absurd filler: must not reach the gradient
    xp = xp.clone().requires_grad_(True)
    loss = masked_sum(model(xp).pow(2).sum(dim=1), mask)
    loss.backward()
    assert torch.all(xp.grad[3:] == 0)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = model(x).pow(2).sum()
    reference.backward()
    assert torch.allclose(loss, reference)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad)


def test_masked_sum_ignores_non_finite_padding_and_handles_extra_dims():
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0], [float("nan"), float("inf")]])
    assert masked_sum(loss, torch.tensor([True, True, False])).item() == 10.0
    assert masked_sum(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize(
    ("loss", "mask", "name"),
    [
        (torch.ones(3), torch.ones(3), "mask"),
        (torch.ones(3), torch.ones(3, 1, dtype=torch.bool), "mask"),
        (torch.ones(2), torch.ones(3, dtype=torch.bool), "per_example_loss"),
        (torch.tensor(1.0), torch.ones(1, dtype=torch.bool), "per_example_loss"),
    ],
)
def test_masked_sum_rejects_mismatched_shapes(loss, mask, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        masked_sum(loss, mask)
