"""bf16/fp16 activations: norms accumulate in fp32, clipped norms stay <= C up to rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dp as ldp


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(50, 32), nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 50)
    )


def _per_example_clipped_norms(model, ids, dtype, autocast):
    """Run examples one at a time: .grad is then that example's clipped gradient."""
    norms = []
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(ids[i : i + 1])
        out.float().pow(2).sum().backward()
        norms.append(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters())))
    return torch.stack(norms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "low-precision-weights"])
def test_clipped_norm_never_exceeds_threshold_beyond_rounding(dtype, autocast):
    model = _model()
    if not autocast:
        model = model.to(dtype)
    threshold = 0.05
    ldp.make_private(model, clipping="flat", max_grad_norm=threshold)
    ids = torch.randint(0, 50, (6, 12))
    clipped = _per_example_clipped_norms(model, ids, dtype, autocast)
    raw = ldp.group_norms(model)["flat"]
    assert raw.dtype == torch.float32  # norms accumulate in fp32
    eps = torch.finfo(dtype).eps
    assert (clipped <= threshold * (1 + 8 * eps)).all(), clipped
    assert (clipped >= threshold * (1 - 8 * eps)).all()  # every example was clipped


def test_autocast_gradients_match_fp32_engine_closely():
    model, reference = _model(), _model()
    ldp.make_private(model, max_grad_norm=0.5)
    ldp.make_private(reference, max_grad_norm=0.5)
    ids = torch.randint(0, 50, (8, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    out.float().pow(2).sum().backward()
    reference(ids).pow(2).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.05 * float(q.grad.abs().max()))
