"""Every rule x clipping style x clip function against the single-example loop, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from models import CASES, build, examples
from oracle import clipped_sum, median_threshold, per_example_grads

import lightning_dp as ldp
from lightning_dp.engine import clipper_of

CLIPPINGS = ["flat", "layer", "unit", "custom"]


def _custom_groups(model: torch.nn.Module) -> list[list[str]]:
    """Two groups: the first top-level child's parameters and everything else, or, when there
    is nothing else, its weight and its bias (one call feeding two groups)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    first = names[0].split(".")[0]
    rest = sorted({n.rsplit(".", 1)[0] for n in names if n.split(".")[0] != first})
    return [[first], rest] if rest else [names[:1], names[1:]]


def run_case(case, clipping, clip_fn, batch_size, norm_method="auto", freeze=None):
    model, batch = build(case)
    if freeze:
        for name, p in model.named_parameters():
            if name.startswith(freeze):
                p.requires_grad_(False)
    batch = batch[:batch_size] if batch_size <= batch.shape[0] else batch
    spec = _custom_groups(model) if clipping == "custom" else clipping
    private = ldp.make_private(
        copy.deepcopy(model), clipping=spec, clip_fn=clip_fn, norm_method=norm_method,
        fallback=case.fallback,
    )
    clipper = clipper_of(private)
    groups = {name: g.params for name, g in clipper.groups.items()}
    grads = per_example_grads(model, examples(batch), case.loss)
    thresholds = {g: median_threshold(grads, members) for g, members in groups.items()}
    for name, threshold in thresholds.items():
        clipper.groups[name].threshold = threshold

    case.loss(private, batch).backward()

    expected, ref_norms = clipped_sum(grads, groups, thresholds, clip_fn)
    if batch_size > 1:  # clipping must really be exercised
        assert any(n > thresholds[g] for g, norms in ref_norms.items() for n in norms)
    for name, param in private.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} got a gradient"
            continue
        assert param.grad is not None, f"{name} has no gradient"
        want = expected[name] if batch_size else torch.zeros_like(param)
        torch.testing.assert_close(param.grad, want, rtol=1e-9, atol=1e-10, msg=name)
    for group, norms in ldp.group_norms(private).items():
        torch.testing.assert_close(norms, torch.tensor(ref_norms[group], dtype=norms.dtype), rtol=1e-9, atol=1e-12)
    return private


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


@pytest.mark.parametrize("norm_method", ["ghost", "instantiate"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("seq_linear", "conv1d", "conv2d", "conv3d", "tied_lm")], ids=lambda c: c.name)
def test_ghost_and_instantiation_agree_with_loop(case, norm_method):
    run_case(case, "layer", "abadi", batch_size=5, norm_method=norm_method)


def test_frozen_layers_are_skipped():
    case = next(c for c in CASES if c.name == "norms")
    private = run_case(case, "layer", "abadi", batch_size=5, freeze="0.")
    assert all("0." not in g for g in ldp.group_thresholds(private))
