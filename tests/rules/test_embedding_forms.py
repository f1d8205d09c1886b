"""The two embedding forms (rows per token eagerly, pairwise in compiled graphs) agree."""

from __future__ import annotations

import pytest
import torch

from lightning_dp.rules.embedding import EmbeddingUse, PairwiseEmbeddingUse


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
