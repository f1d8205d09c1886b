"""Clipping a batch a few examples at a time (bounded temporaries) changes no result.

The tests' models are small, so by default every call fits in one chunk; here every chunk is
made one example, and each result is compared
against the float64 single-example loop, with clipping exercised, NaN rows and padding rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES, build
from oracle import run_case


import lightning_dp as ldp
from lightning_dp.engine import clipper_of
from lightning_dp.engine import clipper as clipper_module
from lightning_dp.engine.clipper import Clipper
from lightning_dp.rules import base

SPLITTABLE = ("mlp", "seq_linear", "conv1d", "conv2d", "conv3d", "norms", "vit", "custom_leaf")


@pytest.fixture
def one_example_chunks(monkeypatch):
    """Chunks of one example everywhere; returns the list of chunk sizes groups were cut into."""
    for module in (clipper_module, base):
        monkeypatch.setattr(module, "examples_per_chunk", lambda *args, **kwargs: 1)
    chunks: list[int] = []
    original = Clipper._clip_in_chunks

    def spy(self, group_name, contributions, chunk):
        chunks.append(chunk)
        return original(self, group_name, contributions, chunk)

    monkeypatch.setattr(Clipper, "_clip_in_chunks", spy)
    return chunks


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
@pytest.mark.parametrize("clipping", ["flat", "layer", "unit"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_chunks_of_one_example_match_the_loop(case, clipping, clip_fn, one_example_chunks):
    run_case(case, clipping, clip_fn, batch_size=5)
    if case.name in SPLITTABLE and clipping != "flat":
        assert one_example_chunks and set(one_example_chunks) == {1}


@pytest.mark.parametrize("norm_method", ["ghost", "instantiate"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("seq_linear", "conv2d", "conv3d")], ids=lambda c: c.name)
def test_chunks_with_either_norm_method_match_the_loop(case, norm_method, one_example_chunks):
    run_case(case, "layer", "abadi", batch_size=5, norm_method=norm_method)
    assert one_example_chunks


@pytest.mark.parametrize("clipping", ["flat", "layer"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp", "conv2d", "norms", "vit")], ids=lambda c: c.name)
def test_a_nan_example_in_its_own_chunk_is_zeroed(case, clipping, one_example_chunks):
    model, batch = build(case)
    poisoned = batch.clone()
    poisoned[2] = float("nan")
    private = ldp.make_private(copy.deepcopy(model), clipping=clipping, max_grad_norm=0.5)
    reference = ldp.make_private(copy.deepcopy(model), clipping=clipping, max_grad_norm=0.5)
    case.loss(private, poisoned).backward()
    case.loss(reference, torch.cat([batch[:2], batch[3:]])).backward()
    for (name, p), q in zip(private.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert all(int(s.nonfinite) == 1 for s in clipper_of(private).stats.values())


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp", "conv2d", "vit")], ids=lambda c: c.name)
def test_padding_rows_add_nothing_across_chunks(case, one_example_chunks):
    """Rows from ``real_rows`` on are padding (as the strategies pad fixed shapes): chunks past
    that row must contribute exactly zero, and stats cover the real rows only."""
    model, batch = build(case)
    padded = torch.cat([batch[:3], torch.randn_like(batch[:2]) * 10])
    private = ldp.make_private(copy.deepcopy(model), clipping="layer", max_grad_norm=0.5)
    reference = ldp.make_private(copy.deepcopy(model), clipping="layer", max_grad_norm=0.5)
    clipper_of(private).real_rows = 3
    case.loss(private, padded).backward()
    case.loss(reference, batch[:3]).backward()
    for (name, p), q in zip(private.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert all(s.norms.shape == (3,) for s in clipper_of(private).stats.values())
    assert one_example_chunks
