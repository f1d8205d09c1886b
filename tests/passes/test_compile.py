"""Compiled DP training (lightning_dp.compile + the graph pass) against the single-example oracle.

Compilation on CPU costs seconds per model, so one compound model covers the compiled rules
(embedding, conv, group/layer norm, linear on 3-D inputs) and each test compiles once.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from lightning_dp.passes import DPGraphPass
from lightning_dp.passes.join_group_scales import counters
from oracle import clipped_sum, median_threshold, per_example_grads, thresholds_against_oracle
from torch import Tensor, nn

import lightning_dp as ldp


class Compound(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.mix = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.gn(self.conv(self.embed(ids).transpose(1, 2))).transpose(1, 2)
        h = self.ln(torch.tanh(self.mix(h)))
        return self.head(h.mean(1))


def loss_fn(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    return (out.tanh() + 0.5 * out.pow(2)).sum()


GROUPS = {
    "layer": lambda names: {m: [n for n in names if n.startswith(m + ".")] for m in ("embed", "conv", "gn", "mix", "ln", "head")},
    "flat": lambda names: {"flat": names},
    "unit": lambda names: {m: [n for n in names if n.startswith(m + ".")] for m in ("embed", "conv", "gn", "mix", "ln", "head")},
    "custom": lambda names: {"body": [n for n in names if not n.startswith("head")], "head": ["head.weight", "head.bias"]},
}


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Compound().double()
    ids = torch.randint(0, 17, (6, 5))
    ids[:, -1] = ids[:, 0]  # repeated tokens within an example
    return model, ids


@pytest.mark.parametrize(("clipping", "clip_fn", "norm_method"), [
    ("layer", "abadi", "auto"),
    # 23 s each on 2 cores: in the slow run, to keep the default suite under 10 minutes (flat
    # clipping compiled stays in it through the tied-weights test below)
    pytest.param("flat", "abadi", "auto", marks=pytest.mark.slow),
    pytest.param("unit", "abadi", "measure", marks=pytest.mark.slow),
    pytest.param("custom", "automatic", "auto", marks=pytest.mark.slow),
])
def test_compiled_gradients_equal_the_single_example_oracle(clipping, clip_fn, norm_method):
    model, ids = _setup()
    names = [n for n, _ in model.named_parameters()]
    groups = GROUPS[clipping](names)
    grads = per_example_grads(model, [ids[i : i + 1] for i in range(len(ids))], loss_fn)
    thresholds = {g: median_threshold(grads, members) for g, members in groups.items()}
    expected, norms = clipped_sum(grads, groups, thresholds, clip_fn)
    assert all(max(norms[g]) > thresholds[g] for g in groups)  # clipping is really exercised

    spec = {"body": ["embed", "conv", "gn", "mix", "ln"], "head": ["head"]} if clipping == "custom" else clipping
    private = ldp.make_private(copy.deepcopy(model), clipping=spec, clip_fn=clip_fn, max_grad_norm=thresholds,
                               norm_method=norm_method)  # "measure": the cost model inside graphs
    before = counters["groups_joined"]
    compiled = ldp.compile(private, fullgraph=True)
    loss_fn(compiled, ids).backward()

    assert counters["groups_joined"] - before == len(groups)
    for name, param in private.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-11)
    for group, got in ldp.group_norms(private).items():
        torch.testing.assert_close(got, torch.tensor(norms[group], dtype=got.dtype), rtol=1e-9, atol=1e-11)


def test_no_graph_breaks_and_no_recompiles_across_steps_and_thresholds():
    model, ids = _setup()
    private = ldp.make_private(model, clipping="flat", max_grad_norm=1.0)
    compiled = ldp.compile(private, fullgraph=True, dynamic=False)
    torch._dynamo.utils.counters.clear()
    first = None
    for step in range(3):
        private.zero_grad(set_to_none=True)
        loss_fn(compiled, torch.randint(0, 17, ids.shape, generator=torch.Generator().manual_seed(step))).backward()
        norms = ldp.group_norms(private)["flat"]
        first = first if first is not None else norms.clone()
        ldp.engine.clipper_of(private).groups["flat"].threshold = 0.5 * (step + 1)  # adaptive-style update
    stats = torch._dynamo.utils.counters
    assert sum(stats["graph_break"].values()) == 0
    assert stats["stats"]["unique_graphs"] == 1  # compiled once, reused for every step and threshold
    # the threshold read at run time really changed the clipping (not baked into the graph)
    grad_norm = torch.cat([p.grad.flatten() for p in private.parameters()]).norm()
    assert grad_norm <= 1.5 * len(ids) + 1e-9
    assert not torch.equal(norms, first)


def test_a_graph_compiled_without_the_pass_refuses_to_run():
    model, ids = _setup()
    private = ldp.make_private(model, clipping="flat")
    from lightning_dp.compiling import prepare_for_compile

    prepare_for_compile(private)
    compiled = torch.compile(private, backend="aot_eager")  # no inductor, so no DP graph pass
    with pytest.raises(RuntimeError, match="without the lightning_dp graph pass"):
        loss_fn(compiled, ids).backward()


def test_a_layer_unfrozen_after_compiling_is_refused_before_it_trains():
    """An unfrozen layer would recompile into a graph where it trains with plain gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    private = ldp.make_private(model, clipping="layer")
    x = torch.randn(3, 4)
    private(x).sum().backward()
    compiled = ldp.compile(private)
    compiled(x).sum().backward()
    model[0].requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] became trainable after"):
        compiled(x)
    with torch.no_grad():
        compiled(x)  # inference is not training: accepted


def test_plain_torch_compile_checks_the_plan_at_every_call():
    """``torch.compile`` on a private model (not ``ldp.compile``) traced the root's check out of
    the graph: a layer unfrozen afterwards trained unclipped (norm 4.9 with C = 1e-3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    private = ldp.make_private(model, clipping="flat", max_grad_norm=1e-3)
    compiled = torch.compile(private, backend="eager")
    x = torch.randn(6, 4)
    compiled(x).sum().backward()
    assert ldp.group_norms(private)["flat"].shape == (6,)
    model[0].requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] became trainable after"):
        compiled(x)


@pytest.mark.skipif("reason" not in inspect.signature(torch.compiler.disable).parameters,
                    reason="this torch's compiler.disable takes no reason")
def test_plain_fullgraph_compile_names_lightning_dp_compile():
    """That check is a graph break, which fullgraph=True refuses: dynamo's error says why and
    what to call instead, not only that a disabled function was skipped."""
    private = ldp.make_private(nn.Sequential(nn.Linear(4, 3)))
    compiled = torch.compile(private, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"compile a private model with lightning_dp.compile\(model\)"):
        compiled(torch.randn(2, 4))


def test_pass_is_inert_in_inference_graphs():
    model, ids = _setup()
    private = ldp.make_private(model, clipping="layer")
    compiled = ldp.compile(private)
    before = counters["groups_joined"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))
    assert counters["groups_joined"] == before


def test_uuid_covers_the_dp_settings():
    a = DPGraphPass({"clip_fn": "abadi", "groups": {"flat": ["w"]}})
    assert a.uuid() == DPGraphPass({"clip_fn": "abadi", "groups": {"flat": ["w"]}}).uuid()
    assert a.uuid() != DPGraphPass({"clip_fn": "automatic", "groups": {"flat": ["w"]}}).uuid()
    assert a.uuid() != DPGraphPass({"clip_fn": "abadi", "groups": {"a": ["w"]}}).uuid()
    shared = DPGraphPass({"clip_fn": "abadi", "groups": {"flat": ["w"]}, "shared": ["w"]})
    assert a.uuid() != shared.uuid()


class Tied(nn.Module):
    """A head tied to the embedding, and a layer called twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.mix(torch.tanh(self.mix(self.embed(ids)))))


@pytest.mark.parametrize("clipping", ["layer", "flat"])
def test_tied_weights_and_a_module_called_twice_compile_exactly(clipping):
    """Each shared parameter's norm is that of the sum over its uses (the cross terms
    included), computed inside the compiled backward; checked against the single-example loop."""
    torch.manual_seed(0)
    model = Tied().double()
    ids = torch.randint(0, 7, (5, 6))
    private = ldp.make_private(copy.deepcopy(model), clipping=clipping)
    loss_fn(private, ids).backward()  # the eager step shows that `mix` runs twice
    expected, _ = thresholds_against_oracle(model, private, [ids[i : i + 1] for i in range(5)], loss_fn)
    private.zero_grad(set_to_none=True)
    counters.clear()

    loss_fn(ldp.compile(private, fullgraph=True), ids).backward()

    assert counters["shared_parameters"] == 3  # embed.weight (tied), mix.weight and mix.bias (twice)
    for name, param in private.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-11, msg=name)


def test_a_module_called_twice_is_refused_when_no_eager_step_showed_it():
    private = ldp.make_private(Tied())
    with pytest.warns(UserWarning, match="has not run an eager training step"):
        compiled = ldp.compile(private)
    with pytest.raises(RuntimeError, match=r"\['mix.bias', 'mix.weight'\].*used more than once"):
        loss_fn(compiled, torch.randint(0, 7, (5, 6))).backward()


def test_refuses_backends_other_than_inductor():
    with pytest.raises(ValueError, match="backend='inductor'"):
        ldp.compile(ldp.make_private(nn.Linear(2, 2)), backend="eager")


def test_embedding_compiles_without_fullgraph_and_matches_the_oracle():
    """Without fullgraph dynamo would fall back to eager on data-dependent shapes in a backward,
    which compiled sites refuse: the compiled embedding form has fixed shapes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 4, padding_idx=0), nn.Linear(4, 2)).double()
    ids = torch.randint(0, 4, (5, 6))
    grads = per_example_grads(model, [ids[i : i + 1] for i in range(len(ids))], loss_fn)
    groups = {"0": ["0.weight"], "1": ["1.weight", "1.bias"]}
    thresholds = {g: median_threshold(grads, members) for g, members in groups.items()}
    expected, _ = clipped_sum(grads, groups, thresholds)
    private = ldp.make_private(copy.deepcopy(model), max_grad_norm=thresholds)
    loss_fn(ldp.compile(private), ids).backward()
    for name, param in private.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-11)


class Broken(nn.Module):
    """A graph break between two layers: each compiled graph holds one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def test_a_group_split_across_graphs_is_refused_and_per_layer_groups_still_work():
    x = torch.randn(5, 4)
    flat = ldp.make_private(Broken(), clipping="flat")
    with pytest.raises(RuntimeError, match=r"group 'flat' has 1 of its 2 modules"):
        ldp.compile(flat)(x).pow(2).sum().backward()

    torch.manual_seed(0)
    model = Broken()
    eager = ldp.make_private(copy.deepcopy(model), clipping="layer", max_grad_norm=0.1)
    eager(x).pow(2).sum().backward()
    private = ldp.make_private(model, clipping="layer", max_grad_norm=0.1)
    ldp.compile(private)(x).pow(2).sum().backward()
    for got, want in zip(private.parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, want.grad)


def test_compiling_before_any_eager_step_warns_that_the_leak_guard_has_not_checked(recwarn):
    model, ids = _setup()
    private = ldp.make_private(model, clipping="layer")
    with pytest.warns(UserWarning, match="has not run an eager training step"):
        ldp.compile(private)
    other = ldp.make_private(_setup()[0], clipping="layer")
    loss_fn(other, ids).backward()  # one eager step: the guard has seen the model
    recwarn.clear()
    ldp.compile(other)
    assert not [w for w in recwarn if "eager training step" in str(w.message)]
