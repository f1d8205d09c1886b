"""Through the Trainer: the padded language-model loss (a mean over the batch's valid tokens) is
refused, naming the per-example helper; the helper's loss trains."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from dp_fixtures import lightning_dp, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp.losses import sequence_cross_entropy

V, T = 12, 8


def padded_lm_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """Sequences counting up mod V from a random start, of random lengths, padded with -100."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    rows = (start + torch.arange(T + 1)) % V
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    tokens, targets = rows[:, :-1].clone(), rows[:, 1:].clone()
    pad = torch.arange(T) >= lengths[:, None]
    tokens[pad], targets[pad] = 0, -100
    return TensorDataset(tokens, targets)


class PaddedLM(L.LightningModule):
    def __init__(self, loss: str) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(V, 16), nn.Linear(16, V)
        self.loss = loss

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        logits = self(tokens)
        if self.loss == "batch_token_mean":
            return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)
        return sequence_cross_entropy(logits, targets, ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0)


def test_the_padded_lm_token_mean_is_refused_before_any_step():
    model = PaddedLM("batch_token_mean")
    strategy = lightning_dp.DPStrategy(noise_multiplier=0.5, seed=0)
    with pytest.raises(ValueError, match=r"(?s)ignore_index=-100.*lightning_dp\.losses\.sequence_cross_entropy"):
        trainer(strategy).fit(model, DataLoader(padded_lm_data(), batch_size=16))
    assert strategy.private.ledger.steps == 0  # refused before noise was added or a step charged


def test_the_per_example_helper_trains():
    torch.manual_seed(0)
    data = padded_lm_data()
    model = PaddedLM("sequence_cross_entropy")
    tokens, targets = data.tensors
    before = sequence_cross_entropy(model(tokens), targets).mean().item()
    strategy = lightning_dp.DPStrategy(clipping="flat", max_grad_norm=1.0, noise_multiplier=0.3, seed=0)
    fitted = trainer(strategy, max_epochs=6)
    fitted.fit(model, DataLoader(data, batch_size=16))
    after = sequence_cross_entropy(model(tokens), targets).mean().item()
    assert strategy.private.ledger.steps == fitted.global_step == 24
    assert after < 0.7 * before
