"""Poisson sampling of logical batches and their split into physical micro-batches."""

from lightning_dp.data.microbatch import MicroBatch, masked_sum, pad_batch, split_logical_batch
from lightning_dp.data.poisson import PoissonBatchSampler

__all__ = ["MicroBatch", "PoissonBatchSampler", "masked_sum", "pad_batch", "split_logical_batch"]
