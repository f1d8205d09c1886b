"""``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: the torch.func fallback, told where their batch is.

The per-example recomputation loops over the examples (the fused recurrent kernels cannot be
vmapped): one extra forward and backward of the layer per example. Their inputs are ``[B, T, H]`` (``batch_first``) or ``[T, B, H]``, their hidden states
``[layers * directions, B, H]`` either way, and every weight of every layer and direction is
reused at every time step, so a per-example gradient is a sum over time that the fallback's
per-example recomputation gets exactly. Packed sequences are refused: pad and mask instead.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_dp.rules.func_fallback import FuncFallbackRule
from lightning_dp.rules.registry import rules

_STATE_DIM = 1  # hidden and cell states: [layers * directions, B, H]


@rules.register(nn.LSTM, nn.GRU, nn.RNN)
class RecurrentRule(FuncFallbackRule):
    vectorized = False  # the fused recurrent kernels have no vmap batching rule

    def forward(self, site, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # before the fallback flattens it: a PackedSequence's leaves are its [sum(lengths), H]
        # data, whose rows are time steps of every example
        if isinstance(args[0] if args else kwargs.get("input"), PackedSequence):
            raise ValueError(
                f"`{site.path}` ({type(module).__name__}) was called with a PackedSequence, whose "
                "rows are the time steps of all examples together; lightning-dp needs the "
                "examples along a batch dimension. Pass the padded batch instead "
                "(pad_packed_sequence(packed, batch_first=True), or the tensor you packed) and "
                "take each example's output at its own length (exact for a unidirectional layer), e.g. "
                "out[torch.arange(B), lengths - 1] for the last state."
            )
        return super().forward(site, module, *args, **kwargs)

    def example_dims(
        self, module: nn.RNNBase, inputs: list[Any], outputs: list[Tensor]
    ) -> tuple[list[int | None], list[int]]:
        if inputs[0].dim() != 3:
            raise ValueError(
                f"{type(module).__name__} was called with an unbatched input of shape "
                f"{tuple(inputs[0].shape)}; pass a batch of examples."
            )
        seq_dim = 0 if module.batch_first else 1
        in_dims = [seq_dim] + [_STATE_DIM if isinstance(t, Tensor) else None for t in inputs[1:]]
        return in_dims, [seq_dim] + [_STATE_DIM] * (len(outputs) - 1)
