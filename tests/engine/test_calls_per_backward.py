"""A group is clipped once, with every gradient its forward announced: DeiT's class and
distillation tokens (two parameters in one ``torch.cat``) used to hand over one gradient more
than the forward announced, and the group was clipped in two parts, each to the threshold.
Parameters expanded to the batch are now each their own call, whatever consumes them."""

from __future__ import annotations

import pytest
import torch
from oracle import clipped_sum, per_example_grads
from torch import nn

import lightning_dp as ldp
from lightning_dp.engine import clipper_of
from lightning_dp.engine.clipper import Clipper, Site


class TwoTokens(nn.Module):
    """DeiT's embeddings: two learned tokens expanded to the batch and concatenated before the
    patch rows, then a learned position embedding added to every row."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.dist_token = nn.Parameter(torch.randn(1, 1, 4))
        self.positions = nn.Parameter(torch.randn(1, 5, 4))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b = patches.shape[0]
        rows = torch.cat((self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), patches), dim=1)
        return rows + self.positions


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch, self.embeddings, self.head = nn.Linear(6, 4), TwoTokens(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embeddings(self.patch(x))))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out.tanh() + 0.5 * out.pow(2)).sum()


EMBEDDINGS = ["embeddings.cls_token", "embeddings.dist_token", "embeddings.positions"]


def _setup(fraction: float = 0.5) -> tuple[nn.Module, torch.Tensor, float]:
    """The plain model, a batch, and a threshold ``fraction`` of the smallest example's norm of
    the tokens' group."""
    torch.manual_seed(0)
    plain = Model().double()
    x = 3 * torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = per_example_grads(plain, [x[i : i + 1] for i in range(5)], _loss)
    _, norms = clipped_sum(grads, {"embeddings": EMBEDDINGS}, {"embeddings": 1.0})
    return plain, x, fraction * min(norms["embeddings"])


def _private_grads(plain: nn.Module, x: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    model = ldp.make_private(Model().double(), clipping="layer")
    model.load_state_dict(plain.state_dict())
    clipper_of(model).groups["embeddings"].threshold = threshold
    _loss(model, x).backward()
    return {n: model.get_parameter(n).grad for n in EMBEDDINGS}


def test_two_tokens_in_one_cat_are_one_group_clipped_as_the_loop():
    plain, x, threshold = _setup()
    grads = per_example_grads(plain, [x[i : i + 1] for i in range(5)], _loss)
    expected, norms = clipped_sum(grads, {"embeddings": EMBEDDINGS}, {"embeddings": threshold})
    assert min(norms["embeddings"]) > threshold  # every example is clipped

    got = _private_grads(plain, x, threshold)

    for name in EMBEDDINGS:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


def _moved(plain: nn.Module, x: torch.Tensor, threshold: float) -> float:
    full, without_last = _private_grads(plain, x, threshold), _private_grads(plain, x[:-1], threshold)
    return sum(float((full[n] - without_last[n]).pow(2).sum()) for n in EMBEDDINGS) ** 0.5


def test_removing_one_example_moves_the_group_by_at_most_its_threshold():
    plain, x, threshold = _setup()
    assert threshold * 0.99 < _moved(plain, x, threshold) <= threshold * (1 + 1e-9)


def test_a_gradient_the_forward_did_not_announce_is_refused(monkeypatch):
    """The negative control: with one of the tokens' three calls not announced (as the old
    concatenation primitive announced one call for its two tokens), its gradient comes after
    the group was clipped. It is refused; let through, the group is clipped in two parts and one
    example moves the sum past the threshold."""
    plain, x, threshold = _setup(fraction=0.1)  # each part is clipped to the threshold
    announce, calls = Site.announce, []

    def one_call_unannounced(site: Site) -> None:
        if site.path == "embeddings":
            calls.append(site)
            if len(calls) % 3 == 2:  # the distillation token's
                return
        announce(site)

    monkeypatch.setattr(Site, "announce", one_call_unannounced)
    with pytest.raises(RuntimeError, match=r"`embeddings` \(TwoTokens\) handed over a gradient for clipping "
                                           r"groups \['embeddings'\] after they had been clipped"):
        _private_grads(plain, x, threshold)

    monkeypatch.setattr(Clipper, "_refuse_late_use", lambda *args: None)
    moved = _moved(plain, x, threshold)
    assert moved > 1.2 * threshold, moved  # the leak the refusal prevents
