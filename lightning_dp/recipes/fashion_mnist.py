"""Fashion-MNIST (full 60k/10k) with a small GroupNorm CNN: the image recipe.

The data are the four IDX files the Debian package ``dataset-fashion-mnist`` installs under
``/usr/share/datasets/fashion-mnist``; any directory holding them (gzipped or not, e.g. files
downloaded from the Fashion-MNIST repository) works as ``data_dir``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
# Per-pixel mean and std of the training images, for normalisation.
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: magic, dims as big-endian int32, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir: str | Path, split: str) -> TensorDataset:
    """``split`` is ``"train"`` (60k) or ``"t10k"`` (10k); images normalised, shape [N, 1, 28, 28]."""
    tensors = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [Path(data_dir) / f"{split}-{kind}{ext}" for ext in (".gz", "")]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {candidates[0].name} not found in data_dir={str(data_dir)!r}. "
                "Install it with `apt-get install dataset-fashion-mnist` (Debian), or download the "
                "four IDX files of Fashion-MNIST into data_dir."
            )
        tensors.append(torch.from_numpy(read_idx(found).copy()))
    images, labels = tensors
    images = (images.float().div(255).unsqueeze(1) - MEAN) / STD
    return TensorDataset(images, labels.long())


class FashionMNISTDataModule(L.LightningDataModule):
    """Train on the 60k training images, validate and test on the 10k test images.

    Args:
        data_dir: directory of the IDX files.
        batch_size: the *expected* logical batch size under DP (q = batch_size / 60000).
        limit_train: train on the first this-many examples only (quick runs and tests).
    """

    def __init__(self, data_dir: str = DEFAULT_DIR, batch_size: int = 256, limit_train: int | None = None) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.limit_train = data_dir, batch_size, limit_train

    def setup(self, stage: str) -> None:
        train = load_split(self.data_dir, "train")
        if self.limit_train is not None:
            train = TensorDataset(*(t[: self.limit_train] for t in train.tensors))
        self.train, self.test = train, load_split(self.data_dir, "t10k")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=1000)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test.tensors[0]), batch_size=1000)


class FashionCNN(L.LightningModule):
    """A small CNN with GroupNorm (BatchNorm would mix examples and is refused under DP).

    Args:
        channels: output channels of the two convolutions.
        groups: GroupNorm groups.
        lr, momentum: SGD; with DP-SGD a large learning rate and momentum work well.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), groups: int = 4, lr: float = 2.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2), nn.GroupNorm(groups, c1), nn.Tanh(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(c1, c2, 5, padding=2), nn.GroupNorm(groups, c2), nn.Tanh(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Linear(c2 * 49, 64), nn.Tanh(), nn.Linear(64, 10),
        )
        self.example_input_array = torch.zeros(2, 1, 28, 28)
        self.val_acc, self.test_acc = MulticlassAccuracy(10, average="micro"), MulticlassAccuracy(10, average="micro")
        self.val_f1, self.test_f1 = MulticlassF1Score(10), MulticlassF1Score(10)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels, reduction="none")  # per-example losses

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_f1)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_f1)

    def predict_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(1)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy, f1: MulticlassF1Score) -> None:
        images, labels = batch
        logits = self(images)
        accuracy(logits, labels)
        f1(logits, labels)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels))
        self.log(f"{stage}_acc", accuracy, prog_bar=True)
        self.log(f"{stage}_f1", f1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
