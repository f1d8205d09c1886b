"""Activation (gradient) checkpointing recomputes forwards inside the backward: per-example
clipping must count those recomputed calls as the same examples' and stay exact."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import thresholds_against_oracle
from torch import nn
from torch.utils.checkpoint import checkpoint
from zoo import ZOO, available, build, split

import lightning_dp as ldp

HF = [c for c in ZOO if c.name in ("llama", "lora_llama", "gpt2")]


def _exact(model, private, batch, loss):
    expected, _ = thresholds_against_oracle(model, private, split(batch), loss)
    loss(private, batch).backward()
    for name, param in private.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=pytest.mark.skipif(not available(c), reason="needs HF")) for c in HF])
def test_hf_gradient_checkpointing_is_exact(case, reentrant):
    model, batch = build(case)
    model.train()  # HF checkpoints only in training mode (dropout is 0 in the zoo configs)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    assert base.is_gradient_checkpointing
    _exact(model, ldp.make_private(copy.deepcopy(model)), batch, case.loss)


LORA = [c for c in ZOO if c.name in ("lora_llama", "lora_gpt2")]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=pytest.mark.skipif(not available(c), reason="needs peft")) for c in LORA])
def test_flat_lora_under_hf_reentrant_checkpointing_is_refused(case):
    """Only the adapters train, and every one is inside a checkpointed layer, so the first
    clipped call came from a segment's nested backward: the end-of-backward callback was queued
    there and fired after that segment, and the flat group was clipped once per layer (a probe
    measured sqrt(layers) C). Non-reentrant checkpointing stays exact."""
    model, batch = build(case)
    model.train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    private = ldp.make_private(copy.deepcopy(model), clipping="flat")
    with pytest.raises(RuntimeError, match=r"(?s)\.0\..*lora_A.*called inside the backward.*'use_reentrant': False"):
        case.loss(private, batch).backward()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _exact(model, ldp.make_private(copy.deepcopy(model), clipping="flat"), batch, case.loss)


class Checkpointed(nn.Module):
    """torch.utils.checkpoint around each block, as hand-written models do."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.embed = nn.Embedding(20, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h).sum(1)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_torch_checkpoint_around_blocks_is_exact(reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant).double()
    batch = {"ids": torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))}

    def loss(m, b):
        out = m(b["ids"])
        return (out.tanh() + 0.5 * out.pow(2)).sum()

    _exact(model, ldp.make_private(copy.deepcopy(model), clipping="flat"), batch, loss)


class CheckpointFirst(nn.Module):
    """A reentrant checkpoint around the first layers, so the flat group's other calls (the
    head) reach the backward before the checkpointed ones are even counted."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(checkpoint(self.first, x, use_reentrant=True))


def test_a_flat_group_split_by_a_reentrant_checkpoint_is_refused():
    """Before, the head was clipped alone and the recomputed layers as a second group, each to
    C: one example moved the sum by 1.4 C. Non-reentrant checkpointing counts every call in the
    forward and stays exact."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, requires_grad=True)
    model = ldp.make_private(CheckpointFirst(), clipping="flat", max_grad_norm=1e-3)
    with pytest.raises(RuntimeError, match=r"`first.0` \(Linear\) was called inside the backward.*use_reentrant=False"):
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)  # the next step starts clean after the refusal
    ldp.make_private(ldp.strip_private(model), clipping="layer", max_grad_norm=1e-3)
    model(x).sum().backward()  # per-layer groups are whole in either part: accepted
    assert all(p.grad is not None for p in model.parameters())


class CheckpointMiddle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(checkpoint(lambda z: self.b(torch.tanh(self.a(z))), x, use_reentrant=False))


def test_a_non_reentrant_recompute_is_not_counted_twice():
    """The recomputed calls of a non-reentrant checkpoint were announced a second time, so the
    groups of the checkpointed layers waited for calls that never came and were clipped only at
    the end of the backward, holding their factors until then (and refused under FSDP, whose
    gradients leave as soon as a unit's backward ends). Each per-layer group now finishes in its
    own layer's backward, with the same result."""
    import importlib

    clipper_module = importlib.import_module("lightning_dp.engine.clipper")
    torch.manual_seed(0)
    model = CheckpointMiddle().double()
    batch = torch.randn(5, 4, dtype=torch.float64)
    private = ldp.make_private(copy.deepcopy(model), clipping="layer")
    left = []
    finish = clipper_module.Clipper._finish

    def recording_finish(self):
        left.append(sorted(self._uses))
        finish(self)

    clipper_module.Clipper._finish = recording_finish
    try:
        _exact(model, private, {"x": batch}, lambda m, b: m(b["x"]).pow(2).sum())
    finally:
        clipper_module.Clipper._finish = finish
    assert left == [[]]
