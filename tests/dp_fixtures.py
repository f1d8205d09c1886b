"""Small Lightning modules and trainers for the strategy tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import lightning_dp


def toy_dataset(n: int = 96, d: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x, y % classes)


class Classifier(L.LightningModule):
    """``reduction`` picks what training_step returns: per-example, sum or mean losses."""

    def __init__(self, d: int = 8, classes: int = 3, lr: float = 0.5, reduction: str = "none", norm: str | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d, 16)]
        if norm == "batch":
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Tanh(), nn.Linear(16, classes)]
        self.net = nn.Sequential(*layers)
        self.lr, self.reduction = lr, reduction

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction=self.reduction)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(strategy, callbacks=(), **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(strategy=strategy, callbacks=list(callbacks), **defaults)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


__all__ = ["Classifier", "flat_params", "lightning_dp", "toy_dataset", "trainer"]
