"""The embedding forms (rows per token eagerly, one shared row of distinct ids, pairwise in
compiled graphs) agree."""

from __future__ import annotations

import pytest
import torch

from lightning_dp.rules.embedding import (
    EmbeddingUse,
    PairwiseEmbeddingUse,
    SharedRowEmbeddingUse,
    embedding_use,
)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("shape", [(4, 6), (3,)])
def test_pairwise_form_equals_rows_per_token(padding_idx, shape):
    g_ = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, shape, generator=g_)  # few ids: repeats within an example
    g = torch.randn(*shape, 5, generator=g_, dtype=torch.float64)
    weight = torch.zeros(7, 5, dtype=torch.float64, requires_grad=True)
    rows, pairwise = (cls(ids, g, weight, padding_idx) for cls in (EmbeddingUse, PairwiseEmbeddingUse))
    scale = torch.rand(shape[0], generator=g_, dtype=torch.float64)
    scale[0] = 0.0
    torch.testing.assert_close(pairwise.norm_sq("weight"), rows.norm_sq("weight"))
    torch.testing.assert_close(pairwise.per_example("weight"), rows.per_example("weight"))
    torch.testing.assert_close(pairwise.clipped_grad("weight", scale), rows.clipped_grad("weight", scale))
    if padding_idx is not None and (ids == padding_idx).any():
        assert pairwise.per_example("weight")[:, padding_idx].abs().sum() == 0


def _position_ids(batch, row):
    """HF position ids: one row [1, T], expanded to the batch as ``CallSite.enter`` does."""
    return torch.tensor(row).unsqueeze(0).expand(batch, len(row))


@pytest.mark.parametrize("copied", [False, True], ids=["expanded", "copied"])
def test_a_shared_row_of_distinct_ids_needs_no_per_token_sums(copied):
    """Position ids (one row for every example, each id once, as HF's expanded [1, T] row or as
    ``arange(T).expand(B, T).contiguous()``): the shared-row form gives what the rows-per-token
    form gives, including a zeroed example that holds a NaN."""
    g_ = torch.Generator().manual_seed(1)
    ids = _position_ids(4, [3, 1, 4, 0, 6])
    ids = ids.contiguous() if copied else ids
    g = torch.randn(4, 5, 3, generator=g_, dtype=torch.float64)
    g[2, 1, 0] = float("nan")
    weight = torch.zeros(7, 3, dtype=torch.float64, requires_grad=True)
    shared, rows = embedding_use(ids, g, weight, None), EmbeddingUse(ids, g, weight, None)
    assert isinstance(shared, SharedRowEmbeddingUse)
    scale = torch.rand(4, generator=g_, dtype=torch.float64)
    scale[2] = 0.0
    torch.testing.assert_close(shared.norm_sq("weight"), rows.norm_sq("weight"), equal_nan=True)
    torch.testing.assert_close(shared.per_example("weight"), rows.per_example("weight"), equal_nan=True)
    clipped = shared.clipped_grad("weight", scale)
    assert torch.isfinite(clipped).all()
    torch.testing.assert_close(clipped, rows.clipped_grad("weight", scale))
    token_factors = shared.token_factors("weight")
    assert token_factors.rows.shape == (4, 5) and token_factors.cols.shape == (4, 5, 3)


@pytest.mark.parametrize("ids", [
    _position_ids(3, [0, 1, 1]),  # an id twice: its rows must be summed per example
    torch.tensor([[0, 1, 2], [2, 1, 0], [0, 1, 2]]),  # rows differ
    _position_ids(1, [0, 1, 2]),  # one example
    _position_ids(3, [0, 1, 1]).contiguous(),  # copied, with an id twice
    torch.tensor([[0, 1, 2], [0, 1, 2], [0, 2, 1]]),  # only the last row differs
], ids=["repeat", "different", "one-example", "copied-repeat", "last-differs"])
def test_ids_that_are_not_one_shared_row_of_distinct_ids_take_the_general_form(ids):
    weight = torch.zeros(5, 2, requires_grad=True)
    assert type(embedding_use(ids, torch.randn(*ids.shape, 2), weight, None)) is EmbeddingUse


def test_a_shared_row_holding_the_padding_id_takes_the_general_form():
    ids = _position_ids(2, [0, 1, 2])
    weight = torch.zeros(5, 2, requires_grad=True)
    g = torch.randn(2, 3, 2)
    assert type(embedding_use(ids, g, weight, padding_idx=1)) is EmbeddingUse
    assert type(embedding_use(ids, g, weight, padding_idx=4)) is SharedRowEmbeddingUse
