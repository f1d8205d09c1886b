"""Flat vs per-layer fixed vs per-layer adaptive clipping at a fixed epsilon (issue 7).

    python bench/adaptive_thresholds.py --epsilon 3 --epochs 15 --seeds 0 1 2

scikit-learn's bundled digits (no download), a 64-128-128-10 MLP, DP-SGD through
``Trainer(strategy="dp")`` and ``PrivacyAccountant(target_epsilon=...)``: every configuration
spends the same epsilon over the same number of steps. Per-layer fixed thresholds are
C / sqrt(K), so the sensitivity equals flat clipping's C; adaptive thresholds start there and
follow each layer's median norm, their counts paid for out of the same epsilon.

The thresholds scale the update (and its noise), so each configuration gets its own learning
rate, picked from ``--lrs`` by mean validation accuracy (a split of the training set); the
test accuracy at that rate is reported (mean, std and range over the seeds), then the grid.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_classifier import DigitsClassifier, digits_datasets

import lightning_dp

LAYERS = 3


class DeeperDigits(DigitsClassifier):
    """Three linear layers, so per-layer clipping has groups of different norm scales."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))


def configurations(max_grad_norm: float) -> dict[str, dict]:
    per_layer = max_grad_norm / math.sqrt(LAYERS)
    return {
        "flat, fixed C": {"clipping": "flat", "max_grad_norm": max_grad_norm},
        "per-layer, fixed C/sqrt(K)": {"clipping": "layer", "max_grad_norm": per_layer},
        "per-layer, adaptive (r=0.5)": {"clipping": "layer", "max_grad_norm": per_layer,
                                        "thresholds": "adaptive", "target_quantile": 0.5},
    }


def splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train / validation (the last 20% of the example's training split) / test."""
    train, test = digits_datasets()
    x, y = train.tensors
    cut = int(0.8 * len(y))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]), test


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def run(settings: dict, lr: float, seed: int, args: argparse.Namespace) -> tuple[float, float, dict]:
    """Validation and test accuracy of one training run, and what it spent."""
    L.seed_everything(seed, verbose=False)
    train, val, test = splits()
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=args.epsilon, accountant="rdp")
    strategy = lightning_dp.DPStrategy(seed=seed, **settings)
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", max_epochs=args.epochs, callbacks=[accountant],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DeeperDigits(lr)
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size))
    private = strategy.private
    return accuracy(model.net, val), accuracy(model.net, test), {
        "epsilon": accountant.epsilon, "steps": private.ledger.steps,
        "sigma": private.privacy.noise_multiplier, "sigma_eff": private.effective_noise_multiplier,
        "thresholds": lightning_dp.group_thresholds(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64, help="expected logical batch size")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared machine
    start = time.perf_counter()
    best_rows, grid_rows = [], []
    for name, settings in configurations(args.max_grad_norm).items():
        by_lr = {}
        for lr in args.lrs:
            runs = [run(settings, lr, seed, args) for seed in args.seeds]
            by_lr[lr] = ([r[0] for r in runs], [r[1] for r in runs], runs[-1][2])
            grid_rows.append(f"| {name} | {lr:g} | {statistics.mean(by_lr[lr][0]):.3f} "
                             f"| {statistics.mean(by_lr[lr][1]):.3f} |")
        lr = max(by_lr, key=lambda rate: statistics.mean(by_lr[rate][0]))
        _, tests, info = by_lr[lr]
        thresholds = ", ".join(f"{v:.3g}" for v in info["thresholds"].values())
        best_rows.append(
            f"| {name} | {lr:g} | {statistics.mean(tests):.3f} | {statistics.pstdev(tests):.3f} "
            f"| {min(tests):.3f}-{max(tests):.3f} | {info['sigma']:.3f} | {info['sigma_eff']:.3f} "
            f"| {info['epsilon']:.3f} | {info['steps']} | {thresholds} |"
        )
    print(f"target epsilon {args.epsilon}, {args.epochs} epochs, expected batch {args.batch_size}, "
          f"C {args.max_grad_norm}, seeds {args.seeds}, lrs {args.lrs}; "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print("| clipping | lr (best val) | test acc (mean) | std | range | sigma (gradient) "
          "| sigma_eff (charged) | epsilon | steps | final thresholds (last seed) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(best_rows))
    print("\n| clipping | lr | val acc (mean) | test acc (mean) |\n|---|---|---|---|")
    print("\n".join(grid_rows))

if __name__ == "__main__":
    main()
