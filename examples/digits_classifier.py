"""DP training of a small classifier on scikit-learn's bundled digits (8x8 images, 1,797).

    python examples/digits_classifier.py --epsilon 3 --epochs 15

The only DP lines are the strategy and the callback; the LightningModule is plain Lightning.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dp


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Digits scaled to [0, 1], split 80/20 with a fixed permutation."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 2.0) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")  # per-example losses

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64, help="expected logical batch size")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    args = parser.parse_args()

    L.seed_everything(0)
    train, test = digits_datasets()
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=args.epsilon, accountant="rdp")
    trainer = L.Trainer(
        strategy=lightning_dp.DPStrategy(max_grad_norm=args.max_grad_norm),
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[accountant],
        logger=False,
        enable_checkpointing=False,
    )
    model = DigitsClassifier()
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size), DataLoader(test, batch_size=512))
    accuracy = trainer.validate(model, DataLoader(test, batch_size=512), verbose=False)[0]["val_acc"]
    print(f"test accuracy {accuracy:.3f} at epsilon {accountant.epsilon:.3f}, delta {accountant.delta:.2g}")


if __name__ == "__main__":
    main()
