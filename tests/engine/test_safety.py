"""No gradient leaves without clipping; strip_private restores the plain model."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import lightning_dp as ldp


def test_parameter_used_outside_its_module_is_caught():
    model = ldp.make_private(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)))
    x = torch.randn(4, 3)
    loss = model(x).sum() + model[0].weight.pow(2).sum()
    with pytest.raises(ldp.PrivacyLeakError, match=r"`0.weight` received a gradient that bypassed"):
        loss.backward()


def test_multihead_attention_functional_use_of_out_proj_is_covered():
    """MHA reads out_proj.weight functionally; a per-module rule would leak it."""
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    model = ldp.make_private(nn.ModuleDict({"mha": mha}))
    x = torch.randn(3, 5, 4)
    mha(x, x, x)[0].sum().backward()  # no PrivacyLeakError
    assert mha.out_proj.weight.grad is not None


def test_strip_private_restores_plain_gradients():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model = copy.deepcopy(plain)
    ldp.make_private(model, max_grad_norm=1e-3)
    x = torch.randn(5, 3)
    ldp.strip_private(model)
    assert not hasattr(model[0], "_lightning_dp_state") and "forward" not in vars(model[0])
    model(x).sum().backward()
    plain(x).sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    ldp.make_private(model)  # can be made private again


def test_no_grad_forward_runs_plain_and_charges_nothing():
    model = ldp.make_private(nn.Linear(3, 2))
    with torch.no_grad():
        model(torch.randn(4, 3))
    model(torch.randn(2, 3)).sum().backward()
    assert ldp.group_norms(model)["(root)"].shape == (2,)


def test_forward_without_backward_does_not_corrupt_the_next_step():
    torch.manual_seed(0)
    model = ldp.make_private(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), max_grad_norm=0.1)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3)
    model(torch.randn(6, 3))  # discarded forward (e.g. a metric computed with grad on)
    model(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for norms in ldp.group_norms(model).values():
        assert norms.shape == (4,)


def test_module_applied_twice_sums_both_uses_per_example():
    """A weight reached twice per example: its per-example gradient is the sum of both uses."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64)

    def loss_fn(m, inp):
        return m(torch.tanh(m(inp))).pow(2).sum()

    per_example = []
    for i in range(4):
        layer.zero_grad()
        loss_fn(layer, x[i : i + 1]).backward()
        per_example.append(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]))
    norms = torch.stack([g.norm() for g in per_example])
    threshold = float(norms.median())
    expected = sum(g * min(1.0, threshold / (float(g.norm()) + 1e-6)) for g in per_example)

    private = ldp.make_private(copy.deepcopy(layer), max_grad_norm=threshold)
    loss_fn(private, x).backward()
    got = torch.cat([private.weight.grad.flatten(), private.bias.grad])
    torch.testing.assert_close(ldp.group_norms(private)["(root)"], norms)
    torch.testing.assert_close(got, expected)


def test_deepcopy_gives_an_independent_private_model_with_its_guard():
    torch.manual_seed(0)
    model = ldp.make_private(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)), max_grad_norm=0.1)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.add_(1.0)
    x = torch.randn(4, 3)
    twin(x).sum().backward()
    assert model[0].weight.grad is None  # the copy computed with its own parameters
    assert twin[0].weight.grad is not None
    with pytest.raises(ldp.PrivacyLeakError):
        (twin(x).sum() + twin[1].weight.sum()).backward()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()  # dropout off: both backwards see the same function


def _per_example_loss_sum(model, ids):
    logits = model(input_ids=ids).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")


def test_a_layer_unfrozen_after_make_private_is_refused_then_clipped_once_replanned():
    """A careless user freezes the first block, makes the model private, then unfreezes it:
    before, that block trained with ordinary (unclipped) gradients, silently."""
    model = _tiny_gpt2()
    model.transformer.h[0].requires_grad_(False)
    ldp.make_private(model, clipping="flat", max_grad_norm=1e-3)
    ids = torch.randint(0, 50, (4, 8))
    _per_example_loss_sum(model, ids).backward()  # the planned set: accepted
    model.transformer.h[0].requires_grad_(True)
    with torch.no_grad():
        model(input_ids=ids)  # no gradient, nothing to clip: accepted
    with pytest.raises(ValueError, match=r"transformer\.h\.0\..* became trainable after"):
        _per_example_loss_sum(model, ids)

    ldp.strip_private(model)
    ldp.make_private(model, clipping="flat", max_grad_norm=1e-3)
    model.zero_grad(set_to_none=True)
    _per_example_loss_sum(model, ids).backward()
    total = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    _per_example_loss_sum(model, ids[1:]).backward()
    without_first = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ldp.group_norms(model)["flat"].min() > 1e-3  # every example is clipped
    block = model.transformer.h[0].mlp.c_fc.weight
    assert block.grad is not None and block.grad.abs().sum() > 0
    # the DP property, with the unfrozen block included: one example moves the sum by <= S
    assert (total - without_first).norm() <= 1e-3 * (1 + 1e-4)


def test_a_layer_replaced_after_make_private_is_refused_then_clipped_once_replanned():
    """A careless user makes the model private, then puts a new head on it: the new head's
    parameters carry the planned names, but its forward is the plain one and nothing guards
    them, so they trained unclipped (norm 9.4 against C = 1e-3 before this check)."""
    torch.manual_seed(0)
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)), clipping="flat", max_grad_norm=1e-3)
    x = torch.randn(8, 4)
    model(x).sum().backward()
    model[1] = nn.Linear(4, 1)
    with pytest.raises(ValueError, match=r"\['1\.weight', '1\.bias'\].*module put in the model since"):
        model(x)
    model[1].requires_grad_(False)
    model(x).sum().backward()  # a frozen replacement gets no gradient: accepted
    model[1].requires_grad_(True)

    ldp.strip_private(model)
    ldp.make_private(model, clipping="flat", max_grad_norm=1e-3)

    def summed(rows: slice) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model(x[rows]).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = summed(slice(0, 8))
    assert ldp.group_norms(model)["flat"].min() > 1e-3  # every example is clipped
    assert (full - summed(slice(1, 8))).norm() <= 1e-3 * (1 + 1e-4)


def test_the_trainable_check_walks_what_named_parameters_gives():
    """The per-forward check walks the module layout taken once: on a tied HF model it names
    what ``named_parameters`` names, follows freezing, and reports itself out of date when a
    module is added."""
    from lightning_dp.engine.make_private import ModuleLayout

    def unplanned(layout):
        found = layout.check(lambda name, param: None)
        return None if found is None else found[0]

    model = _tiny_gpt2()
    owners = {n: model.get_submodule(n.rpartition(".")[0]) for n, _ in model.named_parameters()}
    layout = ModuleLayout(model, owners)
    assert unplanned(layout) == []
    model.transformer.h[1].requires_grad_(False)
    assert unplanned(layout) == []
    layout = ModuleLayout(model, {n: m for n, m in owners.items() if not n.startswith("transformer.wte")})
    assert unplanned(layout) == ["transformer.wte.weight"]  # tied to lm_head: named once
    model.transformer.extra = nn.Linear(2, 2)
    assert unplanned(layout) is None
    assert unplanned(ModuleLayout(model, owners)) == ["transformer.extra.weight", "transformer.extra.bias"]


def _leave_one_out_moves(model: nn.Module, x: torch.Tensor) -> float:
    def summed(rows: slice) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model(x[rows]).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    return float((summed(slice(0, len(x))) - summed(slice(1, len(x)))).norm())


@pytest.mark.parametrize("how", ["assign", "pickled"])
def test_new_parameter_objects_under_planned_names_are_guarded(how):
    """``load_state_dict(assign=True)`` puts new tensors under the planned names, and a
    pickled model's parameters lose their hooks: the guard is armed on them at the next forward
    (before, a parameter used in the loss took norm 5.7 unclipped with C = 1e-3), and training
    stays clipped."""
    import io

    torch.manual_seed(0)
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)), clipping="flat", max_grad_norm=1e-3)
    x = torch.randn(6, 4)
    model(x).sum().backward()
    if how == "assign":
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        model = torch.load(buffer, weights_only=False)
    with pytest.raises(ldp.PrivacyLeakError, match=r"`0.weight` received a gradient that bypassed"):
        (model(x).sum() + (x @ model[0].weight.t()).sum()).backward()
    assert _leave_one_out_moves(model, x) <= 1e-3 * (1 + 1e-6)
    assert ldp.group_norms(model)["flat"].min() > 1e-3  # every example was clipped


def test_weights_tied_after_make_private_are_refused():
    """Tied after the plan, two uses of one tensor were normed as two parameters: the sum of a
    flat group moved by 1.4 C for one example."""
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), clipping="flat", max_grad_norm=1e-3)
    x = torch.randn(6, 4)
    model(x).sum().backward()
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match=r"\['1\.weight'\] were tied to other parameters after"):
        model(x)


def test_a_layer_that_mixes_examples_put_in_after_make_private_is_refused():
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 1)))
    x = torch.randn(6, 4)
    model(x).sum().backward()
    model[1] = nn.BatchNorm1d(4, affine=False)
    with pytest.raises(ValueError, match=r"`1` is a BatchNorm1d"):
        model(x)


@pytest.mark.parametrize("clipping", ["flat", "layer"])
def test_a_second_backward_through_a_retained_graph_clips_whole_groups(clipping):
    """The second backward's calls were never announced by a forward: each module's gradient
    was clipped as a group of its own, so a flat group of 8 layers released up to sqrt(8) C.
    Its groups are now clipped whole at the end of the backward: the same gradient as the
    first backward's."""
    torch.manual_seed(0)
    model = ldp.make_private(
        nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(8)]),
        clipping=clipping, max_grad_norm=1e-3,
    )
    loss = model(torch.randn(6, 4)).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss.backward()
    for again, before in zip((p.grad for p in model.parameters()), first):
        torch.testing.assert_close(again, before, rtol=1e-6, atol=1e-12)


def test_a_backward_that_raised_leaves_nothing_to_the_next():
    """A backward stopped by the leak guard had stored the factors of a group it had not
    clipped yet; the next backward clipped them together with its own examples."""
    torch.manual_seed(0)
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)), clipping="flat", max_grad_norm=1e-3)
    reference = copy.deepcopy(model)
    x, other = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ldp.PrivacyLeakError):  # raised after the head's factors were stored
        model[2](model[1](model[0](other)) + model[2].weight.sum()).sum().backward()
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_module_in_two_private_models_is_refused():
    """The second make_private rerouted the shared layer to its own engine, so the first model
    clipped it as a separate group (sqrt(2) C for one example under flat clipping)."""
    shared = nn.Linear(4, 8)
    ldp.make_private(nn.Sequential(shared, nn.Tanh(), nn.Linear(8, 3)), clipping="flat")
    with pytest.raises(ValueError, match=r"modules \['0'\] are already part of another private model"):
        ldp.make_private(nn.Sequential(shared, nn.Tanh(), nn.Linear(8, 2)), clipping="flat")


def test_a_layer_unfrozen_after_make_private_and_called_directly_stops_the_step():
    """Calling submodules one by one skips the root's forward, where the plan is checked: the
    unfrozen layer's gradient was accumulated unclipped (norm 4.9 with C = 1e-3). The end of
    the backward checks again, so the step cannot go on unnoticed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    ldp.make_private(model, clipping="flat", max_grad_norm=1e-3)
    x = torch.randn(6, 4)
    model[2](model[1](model[0](x))).sum().backward()  # the planned set, called directly: accepted
    model[0].requires_grad_(True)
    with pytest.raises(ldp.PrivacyLeakError, match=r"\['0.weight', '0.bias'\] became trainable after.*do not step"):
        model[2](model[1](model[0](x))).sum().backward()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_labels_loss_is_warned_about_once():
    """HF's own loss (labels=) is a mean over the batch's tokens: its denominator mixes examples
    (a probe measured 1.02 S removing one). The raw engine cannot see the loss, so it says so
    at the forward; the strategies refuse such a loss by analysing it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = ldp.make_private(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)))
    ids = torch.randint(0, 50, (3, 8))
    model(input_ids=ids).logits.sum().backward()  # no labels: no warning
    with pytest.warns(UserWarning, match=r"GPT2LMHeadModel was called with labels=.*mean over the batch's tokens"):
        model(input_ids=ids, labels=ids).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, labels=ids).loss.backward()  # once per model
