"""A small byte-level GPT trained from scratch on the ``fortunes`` corpus, reporting perplexity.

Data: the Debian package ``fortunes`` installs ~15k quotations under ``/usr/share/games/fortunes``
(files of entries separated by lines holding ``%``). One fortune is one training example, so
the guarantee protects each fortune. Tokens are UTF-8 bytes (vocabulary 256 plus BOS/EOS/pad):
no tokenizer to download.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.text import Perplexity

from lightning_dp.losses import sequence_cross_entropy

DEFAULT_DIR = "/usr/share/games/fortunes"
BOS, EOS, PAD = 256, 257, 258
VOCAB = 259


def read_fortunes(path: str | Path) -> list[str]:
    """Every entry of every fortune file under ``path`` (index ``.dat`` files skipped)."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(
            f"no fortune files in path={str(path)!r}; install them with `apt-get install fortunes` "
            "(Debian), or pass a directory of text files whose entries are separated by '%' lines."
        )
    entries = []
    for file in files:
        text = file.read_bytes().decode("utf-8", errors="replace")
        entries += [e.strip() for e in text.split("\n%\n") if e.strip()]
    return entries


def encode(texts: list[str], seq_len: int) -> Tensor:
    """Rows of ``BOS bytes... EOS`` truncated and padded to ``seq_len + 1`` tokens."""
    rows = torch.full((len(texts), seq_len + 1), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [BOS, *text.encode("utf-8")[: seq_len - 1], EOS]
        rows[i, : len(tokens)] = torch.tensor(tokens)
    return rows


class FortunesDataModule(L.LightningDataModule):
    """Fortunes as byte sequences, split train / validation by a fixed permutation.

    Args:
        path: directory of fortune files.
        seq_len: tokens per example (longer fortunes are truncated).
        batch_size: the *expected* logical batch size under DP.
        val_fraction: held-out share.
        seed: the split's permutation.
    """

    def __init__(self, path: str = DEFAULT_DIR, seq_len: int = 128, batch_size: int = 256, val_fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.path, self.seq_len, self.batch_size, self.val_fraction, self.seed = path, seq_len, batch_size, val_fraction, seed

    def setup(self, stage: str) -> None:
        rows = encode(read_fortunes(self.path), self.seq_len)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(self.val_fraction * len(rows))
        self.train, self.val = TensorDataset(rows[order[n_val:]]), TensorDataset(rows[order[:n_val]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP (nn.Linear / nn.LayerNorm only)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class TinyGPT(L.LightningModule):
    """A GPT-style byte language model; the loss per example is its mean token cross-entropy.

    Args:
        width, depth, heads: model shape.
        seq_len: longest input (size of the position embedding).
        lr: AdamW learning rate.
    """

    def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, seq_len: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(seq_len, width)  # a module, not a bare Parameter: it has a rule
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        self.example_input_array = torch.full((2, seq_len), BOS, dtype=torch.long)
        self.val_perplexity, self.test_perplexity = Perplexity(ignore_index=PAD), Perplexity(ignore_index=PAD)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]  # shared: [1, T]
        x = self.tokens(tokens) + self.positions(positions)
        return self.head(self.norm(self.blocks(x)))

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        rows = batch[0]
        logits = self(rows[:, :-1])
        targets = rows[:, 1:]
        # one loss per fortune: its mean over its own tokens (a mean over the batch's tokens
        # would make each fortune's gradient depend on the others)
        return sequence_cross_entropy(logits, targets, ignore_index=PAD)

    def validation_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_perplexity)

    def test_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_perplexity)

    def _evaluate(self, batch: tuple[Tensor], stage: str, perplexity: Perplexity) -> None:
        rows = batch[0]
        perplexity(self(rows[:, :-1]), rows[:, 1:])
        self.log(f"{stage}_perplexity", perplexity, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
