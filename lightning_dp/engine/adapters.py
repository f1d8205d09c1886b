"""peft adapters whose structure planning must know, found by their layout (peft is not imported).

- **DoRA** (``LoraConfig(use_dora=True)``): the LoRA layer's forward also calls ``lora_A`` and
  ``lora_B`` on an identity matrix, to normalise the adapted weight's columns, and scales its
  output by a trained magnitude vector. Those calls hold no examples, so the example-count guard
  would refuse them; the layer is handled whole by the torch.func fallback instead (as a
  parametrized module is), or refused without ``fallback=True``.
- **Prompt tuning and P-tuning**: peft encodes the virtual prompt once, from one row of prompt
  tokens, and repeats the result over the batch (``PeftModel.get_prompt``). Once repeated, no
  example's gradient of the prompt can be taken apart from the batch's (the engine's expansion
  of the one row then meets peft's repeat and fails on a batch of B * B rows), so they are
  refused before anything runs. Prefix tuning encodes one row per example and is exact.
"""

from __future__ import annotations

from torch import nn

#: peft's prompt encoders whose output ``get_prompt`` repeats over the batch (not
#: ``MultitaskPromptEmbedding``, which encodes every example's row with its task)
_REPEATED_PROMPTS = ("PromptEmbedding", "PromptEncoder")


def is_dora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer with a DoRA adapter, and something trainable in it."""
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    return (
        isinstance(magnitudes, nn.ModuleDict)
        and len(magnitudes) > 0
        and any(p.requires_grad for p in module.parameters())
    )


def refuse_repeated_prompts(model: nn.Module) -> None:
    """Raise ``ValueError`` naming a trainable peft prompt-tuning or P-tuning encoder."""
    for path, module in model.named_modules():
        kind = type(module)
        if (kind.__name__ in _REPEATED_PROMPTS and kind.__module__.startswith("peft.")
                and any(p.requires_grad for p in module.parameters())):
            raise ValueError(
                f"make_private: `{path}` is peft's {kind.__name__} (prompt tuning or P-tuning). "
                "peft encodes the virtual prompt once and repeats it over the batch "
                "(PeftModel.get_prompt), so no example's gradient of the prompt can be taken "
                "apart from the others' and it cannot be clipped per example. Use prefix tuning "
                "(peft.PrefixTuningConfig encodes one prompt row per example; exact) or LoRA."
            )
