"""The model zoo against the single-example loop, in float64, for layer and flat clipping with
abadi and automatic clipping: every case is exact or refused with a clear error, never
silently wrong; and the private model computes the same forward as the plain one."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import clipped_sum, median_threshold, per_example_grads, thresholds_against_oracle
from zoo import ZOO, available, build, split

import lightning_dp as ldp
from lightning_dp.engine import clipper_of

CASES = [pytest.param(c, id=c.name, marks=pytest.mark.skipif(not available(c), reason=f"needs {c.needs}")) for c in ZOO]


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
@pytest.mark.parametrize("clipping", ["layer", "flat"])
@pytest.mark.parametrize("case", CASES)
def test_zoo_matches_single_example_loop(case, clipping, clip_fn):
    model, batch = build(case)
    private = ldp.make_private(copy.deepcopy(model), clipping=clipping, clip_fn=clip_fn, fallback=case.fallback)
    if case.refused:
        with pytest.raises(ValueError, match=case.refused):
            case.loss(private, batch).backward()
        return
    expected, ref_norms = thresholds_against_oracle(model, private, split(batch), case.loss, clip_fn)

    case.loss(private, batch).backward()

    for name, param in private.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-7, atol=1e-9, msg=name)
    for group, norms in ldp.group_norms(private).items():
        want = torch.tensor(ref_norms[group], dtype=norms.dtype)
        torch.testing.assert_close(norms, want, rtol=1e-7, atol=1e-10, msg=group)


@pytest.mark.parametrize("case", CASES)
def test_zoo_private_forward_equals_plain_forward(case):
    model, batch = build(case)
    private = ldp.make_private(copy.deepcopy(model), fallback=case.fallback)
    if case.refused:
        return
    want = case.output(model, batch)
    torch.testing.assert_close(case.output(private, batch), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("gpt2", "bert", "llama", "whisper", "lora_llama", "deit", "siglip_vision")])
def test_zoo_under_bf16_autocast_stays_within_the_autocast_tolerance(case):
    """The existing bf16 tolerance (tests/engine/test_mixed_precision.py): 5% of the largest
    entry, against the float64 single-example loop."""
    model, batch = build(case)
    private = ldp.make_private(copy.deepcopy(model).float(), clipping="flat", fallback=case.fallback)
    clipper = clipper_of(private)
    grads = per_example_grads(model, split(batch), case.loss)
    members = clipper.groups["flat"].params
    threshold = median_threshold(grads, members)
    clipper.groups["flat"].threshold = threshold
    low = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = case.loss(private, low)
    loss.float().backward()
    expected, ref_norms = clipped_sum(grads, {"flat": members}, {"flat": threshold})
    assert max(ref_norms["flat"]) > threshold
    norms = ldp.group_norms(private)["flat"]
    torch.testing.assert_close(norms.double(), torch.tensor(ref_norms["flat"], dtype=torch.float64), rtol=0.05, atol=0.0)
    got = torch.cat([p.grad.double().flatten() for n, p in private.named_parameters() if p.requires_grad])
    want = torch.cat([expected[n].flatten() for n, p in private.named_parameters() if p.requires_grad])
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))
