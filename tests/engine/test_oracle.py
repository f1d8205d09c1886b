"""Every rule x clipping style x clip function against the single-example loop, in float64."""

from __future__ import annotations

import pytest
from models import CASES
from oracle import run_case

import lightning_dp as ldp

CLIPPINGS = ["flat", "layer", "unit", "custom"]


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_example_loop(case, clipping, clip_fn):
    run_case(case, clipping, clip_fn, batch_size=5)


@pytest.mark.parametrize("batch_size", [0, 1])
@pytest.mark.parametrize("clipping", ["flat", "layer"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_batch_of_zero_and_one(case, clipping, batch_size):
    run_case(case, clipping, "abadi", batch_size=batch_size)


@pytest.mark.parametrize("norm_method", ["ghost", "instantiate", "measure"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("seq_linear", "conv1d", "conv2d", "conv3d", "tied_lm")], ids=lambda c: c.name)
def test_ghost_and_instantiation_agree_with_loop(case, norm_method):
    run_case(case, "layer", "abadi", batch_size=5, norm_method=norm_method)


def test_frozen_layers_are_skipped():
    case = next(c for c in CASES if c.name == "norms")
    private = run_case(case, "layer", "abadi", batch_size=5, freeze="0.")
    assert all("0." not in g for g in ldp.group_thresholds(private))
