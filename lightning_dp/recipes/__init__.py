"""Ready-to-run LightningModules and DataModules for the ``configs/`` recipes (offline data)."""

from lightning_dp.recipes.fashion_mnist import FashionCNN, FashionMNISTDataModule
from lightning_dp.recipes.fortunes import FortunesDataModule, TinyGPT
from lightning_dp.recipes.smollm2_lora import FortunesTextDataModule, LoraCausalLM
from lightning_dp.recipes.tweets import MiniLMSentiment, TweetSentimentDataModule

__all__ = [
    "FashionCNN",
    "FashionMNISTDataModule",
    "FortunesDataModule",
    "FortunesTextDataModule",
    "LoraCausalLM",
    "MiniLMSentiment",
    "TinyGPT",
    "TweetSentimentDataModule",
]
