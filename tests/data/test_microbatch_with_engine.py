"""Micro-batching and padding change nothing in the summed clipped gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_dp as ldp
from lightning_dp.data import masked_sum, pad_batch, split_logical_batch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 5)).double()


@pytest.mark.parametrize("clipping", ["layer", "flat"])
@pytest.mark.parametrize("pad", [False, True])
def test_split_and_padded_micro_batches_sum_to_the_unsplit_gradient(clipping, pad):
    model = ldp.make_private(_model(), clipping=clipping, max_grad_norm=0.2)
    ids = torch.randint(1, 20, (11, 6))
    labels = torch.randint(0, 5, (11, 6))

    def per_example_loss(m, x, y):
        return F.cross_entropy(m(x).transpose(1, 2), y, reduction="none").sum(1)

    whole = copy.deepcopy(model)
    per_example_loss(whole, ids, labels).sum().backward()

    for micro in split_logical_batch(list(range(11)), 4, pad=pad):
        (x, y), mask = (ids[micro.indices], labels[micro.indices]), micro.mask
        if pad:
            (x, y), mask = pad_batch((ids[micro.indices[: micro.num_real]], labels[micro.indices[: micro.num_real]]), 4)
        masked_sum(per_example_loss(model, x, y), mask).backward()

    for (name, p), q in zip(model.named_parameters(), whole.parameters()):
        # equal up to floating-point summation order (different GEMM shapes): not bit-identical
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-13, msg=name)
