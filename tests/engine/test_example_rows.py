"""Inputs whose rows are not examples: a position row every example shares, as nanoGPT writes it."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from oracle import clipped_sum, per_example_grads
from torch import nn

import lightning_dp as ldp


class NanoGPTPositions(nn.Module):
    """Token and learned position embeddings, positions built inside the forward."""

    def __init__(self, one_row: bool, copied: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe, self.head = nn.Embedding(11, 6), nn.Embedding(8, 6), nn.Linear(6, 11)
        self.one_row, self.copied = one_row, copied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)  # nanoGPT: shape [T]
        if self.copied:  # one row per example, all the same (the shared-row form, found by value)
            return self.head(self.wte(idx) + self.wpe(pos.expand_as(idx).contiguous()))
        return self.head(self.wte(idx) + self.wpe(pos.unsqueeze(0) if self.one_row else pos))


def _loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(idx)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def test_positions_without_an_example_dim_are_refused_with_the_one_row_fix():
    model = ldp.make_private(NanoGPTPositions(one_row=False))
    idx = torch.randint(11, (3, 5))
    with pytest.raises(ValueError, match=r"`wpe`.*5 rows.*3 examples.*unsqueeze\(0\)"):
        model(idx)


@pytest.mark.parametrize("copied", [False, True], ids=["one-row", "copied-per-example"])
def test_positions_as_one_shared_row_are_clipped_per_example(copied):
    """Given as [1, T], the row is expanded per example (or given already copied per example):
    the clipped sum equals the loop's of single-example gradients, with every norm above C, and
    removing an example moves it by at most C."""
    torch.manual_seed(0)
    plain = NanoGPTPositions(one_row=True, copied=copied).double()
    idx, targets = torch.randint(11, (4, 5)), torch.randint(11, (4, 5))
    examples = [(idx[i : i + 1], targets[i : i + 1]) for i in range(4)]
    reference = per_example_grads(plain, examples, lambda m, e: _loss(m, *e))
    names = [n for n, _ in plain.named_parameters()]
    _, norms = clipped_sum(reference, {"flat": names}, {"flat": 1.0})
    threshold = 0.5 * min(norms["flat"])
    expected, _ = clipped_sum(reference, {"flat": names}, {"flat": threshold})

    def private_sum(rows: slice) -> dict[str, torch.Tensor]:
        model = ldp.make_private(
            NanoGPTPositions(one_row=True, copied=copied).double(), clipping="flat", max_grad_norm=threshold
        )
        model.load_state_dict(plain.state_dict())
        _loss(model, idx[rows], targets[rows]).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    full = private_sum(slice(0, 4))
    for name in names:
        torch.testing.assert_close(full[name], expected[name])
    without_last = private_sum(slice(0, 3))
    moved = sum(float((full[n] - without_last[n]).pow(2).sum()) for n in names) ** 0.5
    assert threshold * 0.99 < moved <= threshold * (1 + 1e-9)


class RepeatedSharedRow(nn.Module):
    """DeBERTa's pattern: a one-row tensor every example shares goes through a private layer and
    is then repeated per example by the model itself."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rel", torch.randn(1, 4, 6))
        self.embed, self.pos_proj = nn.Embedding(11, 6), nn.Linear(6, 6)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)  # [B, T, 6]
        pos = self.pos_proj(self.rel).repeat(idx.shape[0], 1, 1)  # [B, 4, 6] in the plain model
        return torch.bmm(h, pos.transpose(1, 2))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_an_error_after_a_shared_row_was_expanded_names_the_expansion():
    model = ldp.make_private(RepeatedSharedRow())
    with pytest.raises(RuntimeError) as info:
        model(torch.randint(11, (3, 5)))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "`pos_proj` (input [1, 4, 6])" in notes and "3 examples" in notes
    assert "repeats it per example" in notes
    ldp.strip_private(model)
    assert model(torch.randint(11, (3, 5))).shape == (3, 5, 4)  # the hook is gone with the rest


def test_a_submodule_call_after_a_forward_without_backward_counts_its_own_examples():
    """A forward with gradients and no backward (validation without ``no_grad``) left its
    example count behind: one example sent through a submodule afterwards was read as a row
    every one of 6 examples shares, expanded to 6 rows and clipped 6 times (6 C)."""
    torch.manual_seed(0)
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), clipping="flat", max_grad_norm=1e-3)
    x = torch.randn(6, 4) * 3
    model(x)  # never backwarded
    out = model[0](x[:1])
    assert out.shape == (1, 8)
    out.pow(2).sum().backward()
    assert float(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()) <= 1e-3 * (1 + 1e-6)
    model.zero_grad(set_to_none=True)
    model[2](model[1](model[0](x))).sum().backward()  # and a direct forward of all 6 after it
    assert ldp.group_norms(model)["flat"].shape == (6,)


class Anchor(nn.Module):
    """Every example compared with the batch's first (a reference row ``x[:1]``), or a layer
    called on one example at a time in a loop (``x[i:i+1]``), optionally through the fallback."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.l1 = ExpGain() if how == "fallback" else nn.Linear(4, 4)
        self.l2, self.how = nn.Linear(4, 1), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "loop":
            return self.l2(torch.cat([self.l1(x[i : i + 1]) for i in range(x.shape[0])]))
        return self.l2(x - self.l1(x[:1]))


class ExpGain(nn.Module):
    """A module no rule stands for (``exp`` of its parameter): the torch.func fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(-1.0, 1.0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.exp()


def _clipped_sum(x: torch.Tensor, how: str, threshold: float) -> torch.Tensor:
    torch.manual_seed(0)
    model = ldp.make_private(Anchor(how).double(), clipping="flat", max_grad_norm=threshold,
                             fallback=how == "fallback")
    model(x).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("how", ["anchor", "loop", "fallback"])
def test_one_row_sliced_from_the_batch_is_refused(how, monkeypatch):
    """A row sliced from the batch is one example's data, not a row every example shares.
    Expanded as a shared row (the check switched off), leaving example 0 out moves the clipped
    sum by several thresholds; with the check, the forward is refused naming the layer."""
    x = 10 * torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    threshold = 1e-3
    with pytest.raises(ValueError, match=r"`l1` \((Linear|ExpGain)\) was called with one row .* sliced from a "
                                         r"tensor of shape \(8, 4\) .* 8 examples.*x\[:1\]"):
        _clipped_sum(x, how, threshold)
    if how == "loop":
        return  # expanded, the loop's rows do not fit the batch: it fails anyway, later
    monkeypatch.setattr(ldp.engine.clipper.Site, "refuse_row_of_batch", lambda *a, **k: None)
    moved = float((_clipped_sum(x, how, threshold) - _clipped_sum(x[1:], how, threshold)).norm())
    assert moved > 2 * threshold  # the leak the check prevents


def test_one_row_not_sliced_from_the_batch_is_still_shared():
    """The negative control: a learned query row (a parameter, not data) and HF-style position
    ids sliced from a buffer of one row are shared rows, expanded and accepted."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.proj = nn.Parameter(torch.randn(1, 4)), nn.Linear(4, 4)
            self.register_buffer("position_ids", torch.arange(16).unsqueeze(0))
            self.wpe = nn.Embedding(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pos = self.wpe(self.position_ids[:, : x.shape[1]])
            return (self.proj(self.query.detach()) * x.sum(1)).sum(1) + pos.sum((1, 2))

    model = ldp.make_private(Shared())
    model(torch.randn(5, 3, 4)).sum().backward()
    assert model.proj.weight.grad is not None and model.wpe.weight.grad is not None


class HiddenStates(nn.Module):
    """A root forward that returns hidden states; the training loop applies the head itself."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))


def _head_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flatten: bool) -> torch.Tensor:
    h = model(x)  # [B, T, 4]: the root forward ends here
    logits = model.head(h.reshape(-1, 4)).view(*y.shape, 3) if flatten else model.head(h)
    return nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)


def test_a_head_applied_after_the_root_forward_keeps_its_examples():
    """A submodule called after the root's forward on a tensor computed by it continues that
    forward: on hidden states flattened to [B*T, d] it used to start a forward of B*T
    "examples" and clip every token alone (a probe: 1.9-4.5 times the bound, growing with T);
    now refused, naming the flattening. On [B, T, d] it is exact against the loop."""
    torch.manual_seed(0)
    plain = HiddenStates().double()
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    y = torch.randint(3, (4, 5))
    private = ldp.make_private(copy.deepcopy(plain))
    with pytest.raises(ValueError, match=r"`head` .* 20 rows, but this forward holds 4 examples\. "
                                         r"It was called after the model's forward.*\[B\*T, d\]"):
        _head_loss(private, x, y, flatten=True)

    examples = [(x[i : i + 1], y[i : i + 1]) for i in range(4)]
    reference = per_example_grads(plain, examples, lambda m, e: _head_loss(m, *e, flatten=False).sum())
    groups = {"body": ["body.weight", "body.bias"], "head": ["head.weight", "head.bias"]}
    expected, norms = clipped_sum(reference, groups, {"body": 1e-3, "head": 1e-3})
    assert min(min(n) for n in norms.values()) > 1e-3
    private = ldp.make_private(copy.deepcopy(plain), max_grad_norm=1e-3)
    _head_loss(private, x, y, flatten=False).sum().backward()
    for name, param in private.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-7, atol=1e-12)


def test_a_submodule_on_fresh_data_after_the_root_forward_starts_its_own_forward():
    """The negative control: a validation-style root forward with no backward, then a
    submodule alone on new data (no gradient in its input) of another batch size."""
    model = ldp.make_private(HiddenStates())
    model(torch.randn(3, 5, 4))
    model.head(torch.randn(7, 4)).sum().backward()
    assert model.head.weight.grad is not None
