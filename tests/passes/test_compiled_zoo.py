"""``lightning_dp.compile`` on models nobody here wrote (tiny configs, float64) against the
single-example loop: exact with zero graph breaks under ``fullgraph=True`` and no recompilation
across Poisson batch sizes (padded to one shape, as the strategies do), or refused before
compiling with the reason.

CPU inductor costs 20-40 s per HF model, so the default run compiles one (GPT-2 with per-layer
clipping: its head tied to the token embedding, the tied norm's cross terms in the graph); the
rest are ``slow``. HF Llama-family models compute their norms in
float32 whatever the model's dtype, so eager and compiled kernels agree to ~1e-7, not 1e-12.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import thresholds_against_oracle
from zoo import ZOO, available, build, split

import lightning_dp as ldp
from lightning_dp.data.microbatch import pad_batch
from lightning_dp.engine import clipper_of

BY_NAME = {case.name: case for case in ZOO}


def _case(name: str, clipping: str, slow: bool = True):
    case = BY_NAME[name]
    marks = [pytest.mark.skipif(not available(case), reason=f"needs {case.needs}")]
    if slow:
        marks.append(pytest.mark.slow)
    return pytest.param(case, clipping, id=f"{name}-{clipping}", marks=marks)


EXACT = [
    _case("gpt2", "layer", slow=False),  # the head tied to the token embedding
    _case("gpt2", "flat"),
    _case("qwen2_tied", "layer"),
    _case("llama", "flat"),
    _case("llama", "layer"),
    _case("mistral", "layer"),
    _case("lora_llama", "layer"),
    _case("lora_llama", "flat"),
    _case("roberta", "layer"),
    _case("roberta", "flat"),
    _case("vit", "layer"),
    _case("vit", "flat"),  # class token (expanded, concatenated) and position embeddings routed
    _case("deit", "layer"),  # two tokens in one concatenation
    _case("siglip_vision", "layer"),  # a probe repeated per example as an attention's query
    _case("torch_encoder", "layer"),
    _case("torch_encoder", "flat"),
    _case("torch_decoder", "flat"),  # cross-attention through the projections
    _case("scale_shift", "layer"),
    _case("scale_shift", "flat"),
    _case("linear_subclass", "flat"),
    _case("custom_f_linear", "layer"),
    _case("matmul_linear", "layer"),  # x @ w.t(), x @ w, and an in-place add on the output
]

#: Physical batch the compiled model sees, and the Poisson draws padded to it.
PADDED, DRAWS = 4, (3, 1)


@pytest.mark.parametrize(("case", "clipping"), EXACT)
def test_compiled_zoo_matches_the_single_example_loop(case, clipping):
    model, batch = build(case)
    private = ldp.make_private(copy.deepcopy(model), clipping=clipping)
    case.loss(private, batch).backward()  # the eager step the strategies run before compiling
    compiled = ldp.compile(private, fullgraph=True, dynamic=False)
    torch._dynamo.utils.counters.clear()

    for real in DRAWS:
        drawn = {k: v[:real] for k, v in batch.items()}
        expected, _ = thresholds_against_oracle(model, private, split(drawn), case.loss)
        padded, _ = pad_batch(drawn, PADDED)
        clipper_of(private).real_rows = real  # as the strategies do: padding rows add 0
        private.zero_grad(set_to_none=True)

        case.loss(compiled, padded).backward()

        for name, param in private.named_parameters():
            if param.requires_grad:
                # float32 inside the model: noise ~1e-7 of the largest entry; some gradients are
                # 0 in exact arithmetic (a key bias: softmax ignores a shift shared by all keys)
                atol = 1e-5 * float(expected[name].abs().max()) + 1e-12
                torch.testing.assert_close(
                    param.grad, expected[name], rtol=1e-5, atol=atol, msg=f"{real} drawn: {name}"
                )
    stats = torch._dynamo.utils.counters
    assert sum(stats["graph_break"].values()) == 0
    assert stats["stats"]["unique_graphs"] == 1


REFUSED = [
    ("lstm", r"`rnn`.*torch.func fallback"),
    ("falcon", r"dense_h_to_4h.*torch.func fallback"),  # FalconLinear's x @ w.T: the fallback
]


@pytest.mark.parametrize(("name", "match"), REFUSED, ids=[n for n, _ in REFUSED])
def test_compiled_zoo_refuses_what_it_cannot_clip_exactly(name, match):
    case = BY_NAME[name]
    if not available(case):
        pytest.skip(f"needs {case.needs}")
    model, batch = build(case)
    private = ldp.make_private(model, fallback=case.fallback)
    if case.fallback:  # the fallback is chosen at the first call, as in the strategies' eager step
        case.loss(private, batch).backward()
    with pytest.raises(ValueError, match=match):
        ldp.compile(private, fullgraph=True)
