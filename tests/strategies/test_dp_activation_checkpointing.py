"""Gradient checkpointing under ``strategy="dp"`` through the Trainer: the run with HF's
reentrant checkpointing (the self-check on) ends with the parameters of the run without it.
(Under ``dp_fsdp`` the LoRA-Llama of ``test_dp_fsdp_layouts.py`` trains with it.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_dp

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_layouts_run import LoraLlama, data  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
    reason="needs transformers and peft",
)


def _train(checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = LoraLlama(checkpointing=checkpointing)
    trainer = L.Trainer(
        strategy=lightning_dp.DPStrategy(max_grad_norm=0.1, noise_multiplier=0.5, seed=3, max_physical_batch_size=8),
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(data(), batch_size=16))
    assert trainer.strategy.private.pending_self_check is False
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_reentrant_gradient_checkpointing_trains_like_no_checkpointing():
    plain, checkpointed = _train(False), _train(True)
    assert plain.keys() == checkpointed.keys() and all("lora_" in n for n in plain)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-7, msg=name)
