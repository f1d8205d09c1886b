"""Trainer(strategy="dp_fsdp", devices=2) on the layouts users write; Lightning re-runs this
script per rank.

    python fsdp_layouts_run.py OUT_DIR modulelist|lora_llama

``modulelist``: blocks in an ``nn.ModuleList`` and a parameter on the LightningModule itself.
``lora_llama``: a tiny HF Llama with peft LoRA adapters and reentrant gradient checkpointing,
padded text, per-sequence token mean.

Each rank saves: its first Poisson batch, the per-example group norms of the first step, the
groups, the collectives of the second step and of one plain-FSDP2 step on the same batch, and
the parameters it ends with. Rank 0 also saves the initial weights.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fsdp_models import Block  # noqa: E402

import lightning_dp  # noqa: E402
from lightning_dp.engine import clipper_of  # noqa: E402
from lightning_dp.losses import sequence_cross_entropy  # noqa: E402
from lightning_dp.strategies.dp_fsdp import shard_lightning_module  # noqa: E402
from lightning_dp.strategies.fsdp_sharding import sum_gradients_across_ranks  # noqa: E402

VOCAB, SEQ, EXAMPLES = 17, 8, 64


class ListModel(L.LightningModule):
    """Blocks in a ModuleList, and a gain vector the LightningModule owns."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.blocks = nn.ModuleList(Block(8) for _ in range(2))
        self.head = nn.Linear(8, VOCAB)
        self.gain = nn.Parameter(torch.ones(8))

    def forward(self, ids):
        h = self.embed(ids) * self.gain
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def training_step(self, batch, batch_idx=0):
        ids, mask = batch
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return sequence_cross_entropy(self(ids[:, :-1]), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LoraLlama(ListModel):
    """peft LoRA on a tiny HF Llama, with HF gradient checkpointing unless told otherwise."""

    def __init__(self, checkpointing: bool = True) -> None:
        L.LightningModule.__init__(self)
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, head_dim=8)
        base = LlamaForCausalLM(config)
        if checkpointing:  # reentrant: the segment's backward runs as a nested backward
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            base.enable_input_require_grads()
        self.model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))

    def forward(self, ids):
        mask = torch.ones_like(ids)
        return self.model(input_ids=ids, attention_mask=mask).logits

    def training_step(self, batch, batch_idx=0):
        ids, mask = batch
        logits = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return sequence_cross_entropy(logits, targets)


MODELS = {"modulelist": ListModel, "lora_llama": LoraLlama}


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (EXAMPLES, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (EXAMPLES,), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()  # right padding
    return TensorDataset(ids, mask)


class Record(L.Callback):
    """What one rank saw: first batch and norms, second step's collectives."""

    def __init__(self) -> None:
        self.saved: dict = {}
        self._comm: CommDebugMode | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.saved["batch"] = [t.clone() for t in batch]
        if batch_idx == 1:
            self._comm = CommDebugMode()
            self._comm.__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.saved["norms"] = {g: n.clone() for g, n in lightning_dp.group_norms(pl_module).items()}
            self.saved["groups"] = {n: list(g.params) for n, g in clipper_of(pl_module).groups.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._comm is not None:
            self._comm.__exit__(None, None, None)
            self.saved["dp_comms"] = _counts(self._comm)
            self._comm = None


def _counts(comm: CommDebugMode) -> dict[str, int]:
    return {str(k): v for k, v in comm.get_comm_counts().items()}


def plain_fsdp_comms(kind: str, batch: list[torch.Tensor], world_size: int) -> dict[str, int]:
    """The collectives of one forward/backward of the same model under plain FSDP2."""
    torch.manual_seed(0)
    module = MODELS[kind]()
    shard_lightning_module(module, init_device_mesh("cpu", (world_size,)), None, None)
    sum_gradients_across_ranks(module)
    module.training_step(batch).sum().backward()  # warm-up (lazy init)
    with CommDebugMode() as comm:
        module.training_step(batch).sum().backward()
    return _counts(comm)


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()


def main() -> None:
    out, kind = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    module = MODELS[kind]()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    record = Record()
    trainer = L.Trainer(
        strategy=lightning_dp.DPFSDPStrategy(max_grad_norm=0.1, noise_multiplier=0.5, seed=3),
        accelerator="cpu", devices=2, max_steps=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[record],
    )
    trainer.fit(module, DataLoader(data(), batch_size=16))
    rank = trainer.global_rank
    record.saved["params"] = {n: _full(p) for n, p in module.named_parameters()}
    record.saved["plain_comms"] = plain_fsdp_comms(kind, record.saved["batch"], trainer.world_size)
    record.saved["self_check_pending"] = trainer.strategy.private.pending_self_check
    torch.save(record.saved, f"{out}/rank{rank}.pt")
    if rank == 0:
        torch.save(initial, f"{out}/initial.pt")


if __name__ == "__main__":
    main()
