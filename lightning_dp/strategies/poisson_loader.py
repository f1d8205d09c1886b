"""Rebuild the user's train dataloader around Poisson sampling, keeping everything else."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data._utils.collate import default_collate

from lightning_dp.data import PoissonBatchSampler
from lightning_dp.strategies.private_training import batch_size_of


class ExampleRowsCollate:
    """The user's collate_fn, checked to give one row per sampled example.

    Every row of a training batch is clipped as one example, so a collate_fn that returns
    several rows per example (two augmented views), fewer (examples dropped to fit a token
    budget, several packed into one row) or rows that are not examples at all (time-major
    ``pad_sequence``) bounds no single example's influence: a probe measured up to 4.4 C for
    one example. The collated rows are compared with the examples drawn, per batch. An empty
    Poisson batch becomes the collation of one example cut to 0 rows, keeping every tensor's
    shape and dtype. A mapping type pytree cannot flatten (HF's ``BatchEncoding``) becomes a
    dict, so that micro-batching can slice it.
    """

    def __init__(self, collate_fn: Any, dataset: Any) -> None:
        self.collate_fn, self.dataset = collate_fn, dataset

    def __call__(self, examples: list) -> Any:
        if not examples:
            one = _as_tree(self.collate_fn([self.dataset[0]]))
            return tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, one)
        batch = _as_tree(self.collate_fn(examples))
        rows = batch_size_of(batch)
        if rows != len(examples):
            raise ValueError(
                f"lightning-dp: the train dataloader's collate_fn turned {len(examples)} sampled "
                f"examples into a batch of {rows} rows (dim 0 of its first tensor). Each row is "
                "clipped as one example, so a collate_fn that returns several rows per example "
                "(augmented views), drops examples, packs several into one row, or puts time "
                "first (pad_sequence's default batch_first=False) bounds no single example's "
                "influence. Return one row per example, dim 0 indexing the examples "
                "(pad_sequence(..., batch_first=True)); make several views inside training_step, "
                "with one loss per example."
            )
        return batch


def checked_collate(dataloader: DataLoader) -> ExampleRowsCollate:
    """The loader's collate_fn (or the default one), checked to give one row per example."""
    collate = dataloader.collate_fn
    if isinstance(collate, ExampleRowsCollate):
        return collate
    return ExampleRowsCollate(collate or default_collate, dataloader.dataset)


def _as_tree(batch: Any) -> Any:
    """A Mapping that is not a dict (``BatchEncoding``) as a dict; anything else as it is."""
    return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def refuse_several_train_loaders(loaders: Any) -> None:
    """One training DataLoader. Lightning zips several into one batch per step, so row i of
    each loader's batch would be clipped together as one example (removing an example of one
    loader re-pairs every later row), and each loader would be sampled and accounted alone."""
    count = len(tree_leaves(loaders))
    if count > 1:
        raise ValueError(
            f"lightning-dp trains on one training DataLoader, but fit was given {count} "
            f"({type(loaders).__name__} of loaders). Lightning would combine their batches row by "
            "row, and each combined row would be clipped as one example, which bounds no single "
            "example's influence. Join the datasets into one (torch.utils.data.ConcatDataset, or "
            "a Dataset that returns a dict per example) and pass one DataLoader."
        )


def sample_rate_of(dataloader: DataLoader) -> tuple[int, float]:
    """(N, q) from the user's loader: q = batch_size / N, the expected logical batch size."""
    dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"The train dataset is an IterableDataset ({type(dataset).__name__}); Poisson sampling "
            "needs random access to every example. Use a map-style Dataset (with __len__ and "
            "__getitem__)."
        )
    try:
        num_samples = len(dataset)
    except TypeError:
        raise ValueError(
            f"The train dataset ({type(dataset).__name__}) has no __len__; Poisson sampling and "
            "the privacy accounting need the dataset size N. Give it a __len__."
        ) from None
    batch_size = dataloader.batch_size
    if batch_size is None:
        raise ValueError(
            "The train dataloader has no batch_size (a custom batch_sampler?); lightning-dp "
            "replaces batching with Poisson sampling and reads the expected batch size from "
            "DataLoader(batch_size=...). Pass batch_size instead of a batch_sampler."
        )
    if num_samples == 0:
        raise ValueError("The train dataset is empty; there is nothing to train on.")
    return num_samples, min(1.0, batch_size / num_samples)


def fixed_batches_rate(dataloader: DataLoader, num_samples: int, world_size: int) -> float:
    """q for ``poisson=False`` on ``world_size`` devices: a logical batch is every device's batch.
    Each device must hold its own share of the data, each example once: Lightning's
    DistributedSampler pads a dataset that does not split evenly by repeating examples, and
    one example in two rows of a step has twice the sensitivity the noise is scaled to."""
    sampler = dataloader.sampler
    user_sampler = _user_sampler(dataloader)
    if isinstance(user_sampler, (RandomSampler, WeightedRandomSampler)) and user_sampler.replacement:
        raise ValueError(
            f"poisson=False with a {type(user_sampler).__name__} that draws with replacement: an "
            "example can fill several rows of a batch, each clipped as its own example, so its "
            "influence is bounded by a multiple of the threshold, not by one. Use shuffle=True "
            "(each example once per epoch), or Poisson sampling (poisson=True); to weight "
            "examples, weight their per-example losses."
        )
    if world_size > 1 and not isinstance(sampler, DistributedSampler):
        raise ValueError(
            f"poisson=False on {world_size} devices needs each device to train on its own share of "
            f"the data, but the train dataloader's sampler is {type(sampler).__name__}: every "
            "device would see the same examples, each released once per device. Keep Lightning's "
            "use_distributed_sampler=True, or use Poisson sampling (poisson=True)."
        )
    if world_size > 1 and num_samples % world_size and not sampler.drop_last:
        raise ValueError(
            f"poisson=False on {world_size} devices with N={num_samples} examples: "
            f"DistributedSampler evens out the devices by repeating {world_size - num_samples % world_size} "
            "example(s), so those are released twice in a step, with twice the sensitivity the "
            f"noise is scaled to. Make N a multiple of {world_size} (drop examples), or use Poisson "
            "sampling (poisson=True), which splits the data without repeating any."
        )
    return min(1.0, world_size * dataloader.batch_size / num_samples)


def _user_sampler(dataloader: DataLoader) -> Any:
    """The sampler the user gave the loader: Lightning wraps it in a DistributedSampler."""
    sampler = dataloader.sampler
    if isinstance(sampler, DistributedSampler):
        return getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return sampler


def warn_if_sampler_overridden(dataloader: DataLoader, sample_rate: float) -> None:
    """Warn when Poisson sampling replaces a sampler that meant more than a random order.

    ``shuffle=True`` (a plain ``RandomSampler``), the sequential default and the distributed
    sampler Lightning injects lose nothing: Poisson batches are random. Any other sampler's
    intent (weights, a subset, replacement, a custom order) is dropped, because the guarantee
    rests on every example joining each batch independently with the same probability.
    """
    sampler = _user_sampler(dataloader)
    if sampler is None or type(sampler) in (SequentialSampler, DistributedSampler):
        return
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        return  # shuffle=True
    what = {
        WeightedRandomSampler: "its example weights are ignored (every example is sampled with "
        "the same probability); to weight examples, weight their per-example losses",
        SubsetRandomSampler: "its subset is ignored and examples outside it are trained on; pass "
        "torch.utils.data.Subset(dataset, indices) as the dataset instead",
    }.get(type(sampler), "its sampling (order, weights, subset or replacement) is ignored")
    rank_zero_warn(
        f"lightning-dp: the train dataloader's sampler is a {type(sampler).__name__}; it is "
        f"replaced by Poisson sampling (each of the {len(dataloader.dataset)} examples joins "
        f"every batch independently with probability q={sample_rate:.4g}), which the privacy "
        f"guarantee rests on, so {what}."
    )


def poisson_dataloader(dataloader: DataLoader, sampler: PoissonBatchSampler) -> DataLoader:
    """The same loader (collate, workers, pinning...) drawing Poisson logical batches."""
    kwargs: dict[str, Any] = {
        "num_workers": dataloader.num_workers,
        "collate_fn": checked_collate(dataloader),
        "pin_memory": dataloader.pin_memory,
        "timeout": dataloader.timeout,
        "worker_init_fn": dataloader.worker_init_fn,
        "multiprocessing_context": dataloader.multiprocessing_context,
        "persistent_workers": dataloader.persistent_workers,
    }
    if dataloader.num_workers > 0:
        kwargs["prefetch_factor"] = dataloader.prefetch_factor
    return DataLoader(dataloader.dataset, batch_sampler=sampler, **kwargs)
