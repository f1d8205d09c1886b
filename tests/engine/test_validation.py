"""Bad models and bad options are refused before anything runs, with the module and the fix."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from oracle import clipped_sum, per_example_grads
from torch import nn

import lightning_dp as ldp


class MyBatchNorm(nn.BatchNorm1d):
    pass


class NoRule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w.exp()  # not x * w or x + w (those are routed), not linear in w


class LinearWithExtra(nn.Linear):
    def __init__(self) -> None:
        super().__init__(3, 3)
        self.gate = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return super().forward(x) * torch.sigmoid(self.gate)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.BatchNorm1d(3), r"`1` is a BatchNorm1d.*GroupNorm or LayerNorm"),
        (MyBatchNorm(3), r"`1` is a MyBatchNorm.*GroupNorm"),
        (nn.SyncBatchNorm(3), r"SyncBatchNorm"),
        (nn.BatchNorm1d(3, affine=False), r"BatchNorm1d"),
        (nn.InstanceNorm1d(3, track_running_stats=True), r"track_running_stats=False"),
        (nn.Embedding(3, 3, scale_grad_by_freq=True), r"scale_grad_by_freq=False"),
        (nn.Embedding(3, 3, sparse=True), r"sparse=False"),
        (nn.MultiheadAttention(3, 1), r"batch_first=True"),
    ],
)
def test_cross_example_and_unsupported_layers_are_refused(layer, match):
    model = nn.Sequential(nn.Linear(3, 3), layer)
    with pytest.raises(ValueError, match=match):
        ldp.make_private(model)


def test_module_without_a_rule_is_named_with_the_fixes_at_its_first_forward():
    model = ldp.make_private(nn.Sequential(nn.Linear(3, 3), nn.Sequential(NoRule())))
    with pytest.raises(ValueError) as info:
        model(torch.randn(2, 3))
    message = str(info.value)
    assert "`1.0` (NoRule) uses its parameter 'w'" in message
    assert "fallback=True" in message and "freeze" in message


def test_subclass_adding_parameters_is_not_silently_treated_as_its_base():
    model = ldp.make_private(nn.Sequential(LinearWithExtra()))
    with pytest.raises(ValueError, match=r"LinearWithExtra\) uses its parameter 'gate'"):
        model(torch.randn(2, 3))
    model = ldp.make_private(nn.Sequential(LinearWithExtra()), fallback=True)  # accepted when asked
    model(torch.randn(2, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


class PerRowScale(nn.Module):
    """A parameter with a row per example position would mix examples: not an elementwise use."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(rows, 3))

    def forward(self, x):
        return x * self.w


class SquaredScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * (self.w * self.w)  # both operands from the parameter: quadratic in w


@pytest.mark.parametrize("layer", [PerRowScale(2), SquaredScale()], ids=["per-row", "squared"])
def test_elementwise_uses_that_are_not_per_example_are_refused(layer):
    model = ldp.make_private(nn.Sequential(nn.Linear(3, 3), layer))
    with pytest.raises(ValueError, match=r"uses its parameter 'w'"):
        model(torch.randn(2, 3))


class TransposedUse(nn.Module):
    """A parameter's transpose in an op that is not ``x @ w.T``."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.w, self.use = nn.Parameter(torch.ones(4, 3)), use

    def forward(self, x):
        if self.use == "einsum":
            return torch.einsum("bd,dp->bp", x, self.w.T)
        if self.use == "product":
            return x.unsqueeze(-1) * self.w.t()  # [B, 3, 1] * [3, 4]: elementwise, another layout
        return torch.nn.functional.linear(x, self.w.transpose(0, 1).T)  # a transpose of a transpose


@pytest.mark.parametrize("use", ["einsum", "product", "twice"])
def test_a_transposed_parameter_outside_a_matmul_is_refused(use):
    model = ldp.make_private(nn.Sequential(nn.Linear(3, 3), TransposedUse(use)))
    with pytest.raises(ValueError, match=r"\(TransposedUse\) uses its parameter 'w' in "):
        model(torch.randn(2, 3))


class PerHeadMatmul(nn.Module):
    """``x @ w`` on rows that are not examples (heads folded into the batch dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2))

    def forward(self, x):
        batch = x.shape[0]
        return (x.reshape(batch * 2, 2) @ self.w).reshape(batch, 4)


class PropertyTranspose(nn.Module):
    """Falcon's ``FalconLinear``: ``x @ w.T``. Compiled graphs do not show the ``.T`` read to the
    routing, so it is refused in the eager step, with the spelling that is routed."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return x @ self.weight.T


def test_x_at_w_T_is_refused_with_the_routed_spelling():
    model = ldp.make_private(nn.Sequential(nn.Linear(3, 3), PropertyTranspose()))
    with pytest.raises(ValueError, match=r"'weight' in Tensor.T.*fallback=True.*`x @ self.weight.t\(\)`"):
        model(torch.randn(2, 3))


def test_a_matmul_whose_rows_are_not_examples_is_refused_or_falls_back():
    with pytest.raises(ValueError, match=r"\(PerHeadMatmul\) uses its parameter 'w' in .*matmul.*fallback=True"):
        ldp.make_private(nn.Sequential(nn.Linear(4, 4), PerHeadMatmul()))(torch.randn(3, 4))
    model = ldp.make_private(nn.Sequential(nn.Linear(4, 4), PerHeadMatmul()), fallback=True)
    model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_frozen_module_without_a_rule_costs_nothing():
    model = nn.Sequential(nn.Linear(3, 3), NoRule().requires_grad_(False))
    ldp.make_private(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clipping": "global"}, r"clipping='global' is not one of"),
        ({"clip_fn": "soft"}, r"clip_fn='soft' is not one of"),
        ({"norm_method": "fast"}, r"norm_method='fast'"),
        ({"gamma": 0.0}, r"gamma is 0.0"),
        ({"max_grad_norm": -1.0}, r"threshold of group .* is -1.0"),
        ({"max_grad_norm": float("nan")}, r"positive finite"),
        ({"max_grad_norm": {"0": 1.0}}, r"missing \['2'\]"),
        ({"max_grad_norm": {"0": 1.0, "2": 1.0, "9": 1.0}}, r"unknown \['9'\]"),
        ({"clipping": [["0"], ["0.weight", "2"]]}, r"'0.weight' matches several groups"),
        ({"clipping": [["0"]]}, r"'2.weight' matches no group"),
        ({"clipping": [["0"], ["2"], ["5"]]}, r"groups \['5'\] match no trainable parameter"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        ldp.make_private(model, **kwargs)


def test_thresholds_per_group_by_name():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    ldp.make_private(model, max_grad_norm={"0": 0.5, "2": 2.0})
    assert ldp.group_thresholds(model) == {"0": 0.5, "2": 2.0}


def test_making_private_twice_is_refused():
    model = ldp.make_private(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="strip_private"):
        ldp.make_private(model)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
@pytest.mark.parametrize("adapter", ["lora_embedding", "ia3", "dora"])
def test_adapters_read_whole_by_their_layer_need_the_fallback(adapter):
    """peft keeps LoRA-on-embedding and IA3 weights in ParameterDicts that the layer's forward
    reads, and DoRA calls its factors on an identity matrix: without fallback=True they are
    refused at make_private naming the layer and why (they used to reach the leak guard or the
    example-count guard mid-forward); with it they are exact (the zoo's cases)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    config = {
        "lora_embedding": LoraConfig(r=2, target_modules=["wte"]),
        "ia3": IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
        "dora": LoraConfig(r=2, target_modules=["c_attn"], use_dora=True),
    }[adapter]
    why = {"lora_embedding": r"held in \['lora_embedding_A', 'lora_embedding_B'\]",
           "ia3": r"held in \['ia3_l'\]", "dora": r"DoRA.*identity matrix.*use_dora=False"}[adapter]
    model = get_peft_model(_tiny_gpt2(), config)
    with pytest.raises(ValueError, match=rf"(?s)`base_model\.model\.transformer\.\S+` \(\w+\): .*{why}.*fallback=True"):
        ldp.make_private(model)
    ldp.make_private(model, fallback=True)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompts_peft_repeats_over_the_batch_are_refused(method):
    """peft encodes a prompt-tuning or P-tuning prompt from one row and repeats it over the
    batch: no per-example gradient of it exists afterwards (it used to fail inside peft on a
    batch of B * B rows). Prefix tuning, one prompt row per example, is accepted and exact."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    config = (PromptTuningConfig if method == "prompt_tuning" else PromptEncoderConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=3, **({} if method == "prompt_tuning" else {"encoder_hidden_size": 8}))
    model = get_peft_model(_tiny_gpt2(), config)
    with pytest.raises(ValueError, match=r"`prompt_encoder\.default` is peft's Prompt\w+ .*repeats it over the batch.*prefix tuning"):
        ldp.make_private(model, fallback=True)
    prefix = ldp.make_private(get_peft_model(_tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)))
    prefix(input_ids=torch.randint(0, 50, (4, 5))).logits.sum().backward()


class _LastState(nn.Module):
    """An LSTM classifier on each sequence's state at its own length, packed or padded."""

    def __init__(self, packed: bool) -> None:
        super().__init__()
        self.packed, self.lstm, self.head = packed, nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.packed:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            return self.head(self.lstm(packed)[1][0][-1])
        out = self.lstm(x)[0]
        return self.head(out[torch.arange(x.shape[0]), lengths - 1])


def test_a_packed_sequence_is_refused_and_the_padded_form_it_names_is_exact():
    """A PackedSequence's data has one row per time step of all examples: refused, naming the
    layer. The padded form the message suggests gives each example the gradient its packed
    sequence would, clipped and summed as the single-example loop of the packed model."""
    torch.manual_seed(0)
    x, lengths = torch.randn(4, 5, 3, dtype=torch.float64), torch.tensor([5, 3, 4, 2])
    with pytest.raises(ValueError, match=r"`lstm` \(LSTM\) was called with a PackedSequence.*"
                                         r"pad_packed_sequence.*lengths - 1"):
        ldp.make_private(_LastState(packed=True).double())(x, lengths)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(*batch).pow(2).sum()

    packed = _LastState(packed=True).double()
    grads = per_example_grads(packed, [(x[i : i + 1], lengths[i : i + 1]) for i in range(4)], loss)
    names = [n for n, _ in packed.named_parameters()]
    _, norms = clipped_sum(grads, {"flat": names}, {"flat": 1.0})
    threshold = 0.5 * min(norms["flat"])
    expected, _ = clipped_sum(grads, {"flat": names}, {"flat": threshold})
    padded = _LastState(packed=False).double()
    padded.load_state_dict(packed.state_dict())
    private = ldp.make_private(padded, clipping="flat", max_grad_norm=threshold)
    loss(private, (x, lengths)).backward()
    for name, param in private.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)


class _OldStyleSquare(torch.autograd.Function):
    """An autograd.Function without setup_context (as peft's LoHa writes its own): torch.func
    cannot run it."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return w * w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return 2 * w * g


class _SquaredWeight(nn.Module):
    def __init__(self, exp: bool = True) -> None:
        super().__init__()
        self.w, self.exp = nn.Parameter(torch.randn(3, 3)), exp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w.exp() if self.exp else self.w  # exp: not routed, so the fallback runs the module
        return x @ _OldStyleSquare.apply(w)


def test_a_parameter_read_by_a_custom_autograd_function_is_refused():
    """Ops inside a custom Function's forward run without grad, so routing does not see the
    parameter used; its raw gradient is refused when it arrives."""
    model = ldp.make_private(nn.Sequential(_SquaredWeight(exp=False)), fallback=True)
    with pytest.raises(ldp.PrivacyLeakError, match=r"`0.w` received a gradient that bypassed.*custom autograd.Function"):
        model(torch.randn(4, 3)).sum().backward()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_code_the_fallback_cannot_transform_is_named_in_the_error():
    model = ldp.make_private(nn.Sequential(_SquaredWeight()), fallback=True)
    with pytest.raises(RuntimeError, match="setup_context") as info:
        model(torch.randn(4, 3)).sum().backward()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "recomputed `0` (_SquaredWeight) per example" in notes and "freeze" in notes
