"""``norm_method="measure"``: both methods timed once per layer shape, the faster one kept.

The timer is replaced by a fixed table here (which method "runs faster" is the test's choice),
so the tests check the mechanism: what is timed, on how many examples, how often, and where
measuring is skipped. That the measured choice changes no result is in ``test_oracle.py``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from lightning_dp.rules import norm_method
from lightning_dp.rules.conv import ConvSpec, ConvUse
from lightning_dp.rules.protocol import examples_per_chunk

linear = importlib.import_module("lightning_dp.rules.linear")


@pytest.fixture
def timer(monkeypatch):
    """Times by table: ``timer.seconds[method]``; records (method, examples) per timing."""

    class Timer:
        def __init__(self) -> None:
            self.seconds = {"ghost": 2.0, "instantiate": 1.0}
            self.calls: list[tuple[str, int]] = []

        def __call__(self, build, method, examples):
            use = build(method, examples)
            assert use.method == method and use.batch_size == examples
            self.calls.append((method, examples))
            return self.seconds[method]

    fake = Timer()
    monkeypatch.setattr(norm_method, "_FASTEST", {})
    monkeypatch.setattr(norm_method, "_seconds", fake)
    return fake


def linear_use(batch, tokens, p, d, method="measure", spare=0):
    params = {"weight": torch.zeros(p, d, requires_grad=True), "bias": torch.zeros(p, requires_grad=True)}
    return linear.LinearUse(torch.randn(batch, tokens, d), torch.randn(batch, tokens, p), params,
                            transposed=False, norm_method=method, spare=spare)


def test_each_shape_is_timed_once_and_the_faster_method_kept(timer):
    assert linear_use(8, 16, 12, 10).method == "instantiate"
    assert sorted(m for m, _ in timer.calls) == ["ghost", "instantiate"]
    assert linear_use(8, 16, 12, 10).method == "instantiate"
    assert len(timer.calls) == 2  # remembered
    timer.seconds = {"ghost": 1.0, "instantiate": 2.0}
    assert linear_use(8, 32, 12, 10).method == "ghost"  # another shape: timed again
    assert len(timer.calls) == 4
    assert linear_use(7, 32, 12, 10).method == "ghost"  # batches 5-8 share one timing (Poisson)
    assert len(timer.calls) == 4
    assert linear_use(9, 32, 12, 10).method == "ghost" and len(timer.calls) == 6


def test_timing_uses_no_more_examples_than_a_clipping_chunk(timer):
    batch, tokens, p, d = 64, 8, 256, 256
    linear_use(batch, tokens, p, d)
    chunk = examples_per_chunk(batch, p * d, tokens * (p + d))
    assert chunk < batch
    assert {examples for _, examples in timer.calls} == {chunk}


def test_nothing_is_timed_where_one_method_is_the_only_sensible_one(timer, monkeypatch):
    assert linear_use(8, 1, 12, 10).method == "ghost"  # one token: ghost is trivial
    assert linear_use(0, 16, 12, 10).method in ("ghost", "instantiate")  # no example to time
    monkeypatch.setattr(norm_method, "INSTANTIATE_MAX_NUMEL", 100)
    assert linear_use(8, 16, 12, 10).method == "ghost"  # instantiation would not fit
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(norm_method, "INSTANTIATE_MAX_NUMEL", 2**26)
    expected = norm_method.choose_norm_method(8, 16, 12, 10, "auto")
    assert linear_use(8, 16, 12, 10).method == expected  # compiled graphs: the cost model
    assert timer.calls == []


def test_convolutions_are_measured_per_shape_too(timer):
    spec = ConvSpec(kernel_size=(3,), stride=(1,), padding=(1,), dilation=(1,), groups=1)
    weight = torch.zeros(6, 4, 3, requires_grad=True)
    use = ConvUse(torch.randn(5, 4, 20), torch.randn(5, 6, 20), {"weight": weight}, spec, weight, "measure")
    assert use.method == "instantiate" and len(timer.calls) == 2
    timer.seconds = {"ghost": 1.0, "instantiate": 2.0}
    same = ConvUse(torch.randn(5, 4, 20), torch.randn(5, 6, 20), {"weight": weight}, spec, weight, "measure")
    assert same.method == "instantiate" and len(timer.calls) == 2


def test_the_real_timer_picks_one_of_the_two(monkeypatch):
    monkeypatch.setattr(norm_method, "_FASTEST", {})
    use = linear_use(4, 16, 8, 8)
    assert use.method in ("ghost", "instantiate")
    assert norm_method._FASTEST  # remembered for the next call


@pytest.mark.parametrize(("tokens", "p", "d"), [(3, 5, 7), (12, 4, 5), (12, 6, 3), (2, 9, 9)])
def test_ghost_norms_equal_the_instantiated_gradients_norms(tokens, p, d):
    """Both forms of the ghost norm (a second Gram matrix while T <= the narrower width, the
    Gram matrix times the narrower factor beyond) against ||g_i^T x_i||^2 built by hand."""
    torch.manual_seed(0)
    g, x = torch.randn(4, tokens, p, dtype=torch.float64), torch.randn(4, tokens, d, dtype=torch.float64)
    expected = torch.stack([(g[i].t() @ x[i]).pow(2).sum() for i in range(4)])
    torch.testing.assert_close(linear.ghost_norm_sq(g, x), expected, rtol=1e-12, atol=0)


def test_instantiation_that_would_be_chunked_costs_more_on_the_cpu():
    """A GPT's untied LM head at T=64 (the first layer of the backward: nothing freed yet) does
    not fit the workspace, so instantiation would run in chunks: ghost there. The same layer
    later in a backward, with room freed, and a layer that fits, keep instantiation."""
    batch, tokens, p, d = 16, 64, 2000, 128
    assert examples_per_chunk(batch, p * d, tokens * (p + d)) < batch  # the premise
    assert norm_method.choose_norm_method(batch, tokens, p, d, "auto", "cpu") == "instantiate"
    assert norm_method.choose_norm_method(batch, tokens, p, d, "auto", "cpu", spare=0) == "ghost"
    assert linear_use(batch, tokens, p, d, "auto").method == "ghost"
    assert linear_use(batch, tokens, p, d, "auto", spare=batch * p * d).method == "instantiate"
    assert linear_use(batch, tokens, 128, 128, "auto").method == "instantiate"  # fits
    assert linear_use(batch, 256, p, d, "auto").method == "instantiate"  # T^2 (p + d) too large
    # accelerators: their one (estimated) constant, chunks or not
    assert (norm_method.choose_norm_method(batch, tokens, p, d, "auto", "cuda", spare=0)
            == norm_method.choose_norm_method(batch, tokens, p, d, "auto", "cuda"))


def test_every_timed_run_follows_a_write_through_the_caches(monkeypatch):
    """In a step a layer's clipping reads its tensors from memory, not from a warm cache: each
    of the three runs per method (the untimed first one too) starts after the caches were
    written over, and the buffer is made once per method, not per run."""
    events = []
    real_write = norm_method.write_through_caches

    def write(device, buffer):
        events.append(("write", buffer is None))
        return torch.zeros(1)

    def synchronize(device):
        events.append(("sync", None))

    monkeypatch.setattr(norm_method, "_FASTEST", {})
    monkeypatch.setattr(norm_method, "write_through_caches", write)
    monkeypatch.setattr(norm_method, "_synchronize", synchronize)
    linear_use(8, 16, 12, 10)
    runs = [events[i : i + 3] for i in range(0, len(events), 3)]
    assert len(runs) == 6  # two methods, three runs each
    assert all(run == [("write", run[0][1]), ("sync", None), ("sync", None)] for run in runs)
    assert [run[0][1] for run in runs] == [True, False, False] * 2
    buffer = real_write(torch.device("cpu"), None)
    assert buffer.numel() * buffer.element_size() == norm_method.EVICT_BYTES
