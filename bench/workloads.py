"""Model + synthetic batch for each benchmark model, and the size presets (CPU, H100, H200).

A workload is ``(model, inputs, targets)``; the step's loss is ``models.per_example_loss``
(cross-entropy per example; a sequence's token losses summed). Shapes are plain dicts so that
they travel to child processes as JSON.
"""

from __future__ import annotations

from typing import Any

MODELS = ("cnn", "gpt", "vit", "hf-llama", "hf-gpt2")

# CPU sizes keep the whole suite to minutes on 2 cores; GPU sizes are the reference shapes
# (GPT-2 small, ViT-B/16, a CIFAR-sized CNN). H100 and H200 share shapes and differ in the
# default memory budget of the largest-batch search (80 GiB vs 141 GiB cards, minus headroom).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "budget_mib": 256,
        "cnn": dict(image=32, width=32, classes=10, batch=32),
        "gpt": dict(vocab=2000, d=128, layers=2, heads=4, seq=128, batch=8),
        "vit": dict(image=32, patch=4, d=128, layers=2, heads=4, classes=10, batch=16),
        # an HF model as users build it: LlamaForCausalLM (RMSNorm routed, grouped-query attention)
        "hf-llama": dict(vocab=2000, d=128, layers=2, heads=4, kv_heads=2, seq=128, batch=8),
        # the GPT-2 shape as users build it: GPT2LMHeadModel, its head tied to the token embedding
        "hf-gpt2": dict(vocab=2000, d=128, layers=2, heads=4, seq=128, batch=8),
    },
    "gpu-h100": {
        "budget_mib": 76_000,
        "cnn": dict(image=32, width=64, classes=10, batch=256),
        "gpt": dict(vocab=50257, d=768, layers=12, heads=12, seq=256, batch=16),
        "vit": dict(image=224, patch=16, d=768, layers=12, heads=12, classes=1000, batch=64),
        "hf-llama": dict(vocab=32000, d=768, layers=12, heads=12, kv_heads=4, seq=256, batch=16),
        "hf-gpt2": dict(vocab=50257, d=768, layers=12, heads=12, seq=256, batch=16),
    },
}
PRESETS["gpu-h200"] = dict(PRESETS["gpu-h100"], budget_mib=135_000)


#: Token models, which ``--seqs`` runs at several sequence lengths.
TOKEN_MODELS = ("gpt", "hf-llama", "hf-gpt2")


def at_sequence_length(shape: dict, seq: int) -> dict:
    """A token model's shape at ``seq``: the preset's tokens per batch (batch * seq, at least two
    examples), and one layer from T = 512 on, so that a CPU run of the long sequences stays
    within minutes."""
    tokens = shape["batch"] * shape["seq"]
    return dict(shape, seq=seq, batch=max(2, tokens // seq), layers=shape["layers"] if seq < 512 else 1)


def describe(model: str, shape: dict) -> str:
    """A short label of a model and its shape, for table headings."""
    dims = ", ".join(f"{k}={v}" for k, v in shape.items() if k != "batch")
    return f"{model} ({dims})"


def build(model: str, shape: dict, batch: int, device: Any) -> tuple[Any, Any, Any]:
    """The model (seeded) and a synthetic batch of ``batch`` examples, on ``device``."""
    import torch
    from models import CNN, GPT, CNNConfig, GPTConfig, ViT, ViTConfig

    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    if model in ("gpt", "hf-llama", "hf-gpt2"):
        tokens = torch.randint(shape["vocab"], (batch, shape["seq"] + 1), generator=data)
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        if model == "gpt":
            net = GPT(GPTConfig(shape["vocab"], shape["d"], shape["layers"], shape["heads"], shape["seq"]))
        elif model == "hf-llama":
            net = _hf_llama(shape)
        else:
            net = _hf_gpt2(shape)
    else:
        if model == "vit":
            net = ViT(ViTConfig(shape["image"], shape["patch"], shape["d"], shape["layers"],
                                shape["heads"], shape["classes"]))
        elif model == "cnn":
            net = CNN(CNNConfig(shape["image"], shape["width"], shape["classes"]))
        else:
            raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
        inputs = torch.randn(batch, 3, shape["image"], shape["image"], generator=data)
        targets = torch.randint(shape["classes"], (batch,), generator=data)
    return net.to(device), inputs.to(device), targets.to(device)


def _hf_llama(shape: dict) -> Any:
    """transformers' LlamaForCausalLM from a config (no download), returning logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["d"], intermediate_size=4 * shape["d"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=shape["seq"],
    )
    return _logits_only(LlamaForCausalLM(config))


def _hf_gpt2(shape: dict) -> Any:
    """transformers' GPT2LMHeadModel from a config (tied head, dropout off), returning logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=shape["vocab"], n_embd=shape["d"], n_layer=shape["layers"],
        n_head=shape["heads"], n_positions=shape["seq"], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return _logits_only(GPT2LMHeadModel(config))


def _logits_only(model: Any) -> Any:
    """The HF model called as ``model(input_ids=...)``, returning only its logits."""
    from torch import nn

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any) -> Any:
            return self.model(input_ids=input_ids).logits

    return Logits()
