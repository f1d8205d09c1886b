"""PoissonBatchSampler: Binomial batch sizes, inclusion rate q, empty batches, ranks, resume."""

import io
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader

from lightning_dp.data import PoissonBatchSampler

ALPHA = 1e-3  # seeded tests: fixed outcome; chosen so a correct sampler passes comfortably.


def _sizes_chi2_pvalue(sizes, n, q):
    """Chi-square goodness of fit of batch sizes to Binomial(n, q), tails merged (expected >= 5)."""
    total = len(sizes)
    counts = np.bincount(sizes, minlength=n + 1)
    expected = stats.binom.pmf(np.arange(n + 1), n, q) * total
    lo = np.argmax(np.cumsum(expected) >= 5)
    hi = n - np.argmax(np.cumsum(expected[::-1]) >= 5)
    obs = [counts[: lo + 1].sum(), *counts[lo + 1: hi], counts[hi:].sum()]
    exp = [expected[: lo + 1].sum(), *expected[lo + 1: hi], expected[hi:].sum()]
    return stats.chisquare(obs, exp).pvalue


@pytest.fixture(scope="module")
def batches():
    return list(PoissonBatchSampler(50, 0.1, steps=4000, generator=0))


def test_batch_sizes_are_binomial(batches):
    sizes = [len(b) for b in batches]
    assert _sizes_chi2_pvalue(sizes, 50, 0.1) > ALPHA
    assert _sizes_chi2_pvalue(sizes, 50, 0.12) < ALPHA  # negative control: wrong q rejected


def test_each_example_is_included_at_rate_q(batches):
    counts = Counter(i for b in batches for i in b)
    assert set(counts) == set(range(50))
    for i in range(50):  # Bonferroni over the 50 examples
        assert stats.binomtest(counts[i], 4000, 0.1).pvalue > ALPHA / 50
    total = sum(counts.values())
    assert stats.binomtest(total, 50 * 4000, 0.1).pvalue > ALPHA
    assert stats.binomtest(total, 50 * 4000, 0.105).pvalue < ALPHA  # negative control


def test_batches_are_sorted_unique_valid_indices(batches):
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < 50 for i in b)


def test_empty_batches_occur_at_rate_one_minus_q_to_the_n():
    sampler = PoissonBatchSampler(10, 0.1, steps=4000, generator=1)
    empty = sum(1 for b in sampler if b == [])
    assert stats.binomtest(empty, 4000, 0.9**10).pvalue > ALPHA
    assert stats.binomtest(empty, 4000, 0.88**10).pvalue < ALPHA  # negative control


def test_empty_batches_pass_through_a_dataloader():
    sampler = PoissonBatchSampler(10, 0.1, steps=200, generator=2)
    loader = DataLoader(list(range(10)), batch_sampler=sampler, collate_fn=list)
    assert list(loader) == list(PoissonBatchSampler(10, 0.1, steps=200, generator=2))
    assert [] in list(loader)


def test_length_defaults_to_one_expected_epoch():
    assert len(PoissonBatchSampler(100, 0.3)) == 3
    assert len(PoissonBatchSampler(100, 0.01)) == 100
    assert len(PoissonBatchSampler(100, 1.0)) == 1
    assert len(list(PoissonBatchSampler(100, 0.01, steps=7))) == 7
    assert PoissonBatchSampler(1000, 0.01, world_size=4).expected_batch_size == 10.0


def test_deterministic_given_seed_or_generator():
    def draw(**kw):
        return list(PoissonBatchSampler(30, 0.2, steps=20, **kw))

    assert draw(generator=5) == draw(generator=5)
    assert draw(generator=5) != draw(generator=6)
    assert draw(generator=torch.Generator().manual_seed(3)) == draw(
        generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    first = draw()
    torch.manual_seed(11)
    assert draw() == first


def test_next_pass_continues_the_stream():
    sampler = PoissonBatchSampler(30, 0.2, steps=10, generator=0)
    assert list(sampler) != list(sampler)


def test_ranks_partition_the_data_and_draw_independent_streams():
    world, n, steps = 3, 20, 300
    per_rank = [list(PoissonBatchSampler(n, 0.2, steps=steps, generator=7, rank=r,
                                         world_size=world)) for r in range(world)]
    seen = set()
    for rank, batches in enumerate(per_rank):
        drawn = {i for b in batches for i in b}
        assert all(i % world == rank for i in drawn)
        seen |= drawn
    assert seen == set(range(n))
    for step in range(steps):
        union = [i for r in range(world) for i in per_rank[r][step]]
        assert len(union) == len(set(union))
    # Same seed, different ranks: the local inclusion patterns are different streams.
    local = [[[i // world for i in b] for b in batches] for batches in per_rank]
    assert local[0] != local[1]
    sizes = [len(b0) + len(b1) + len(b2) for b0, b1, b2 in zip(*per_rank)]
    assert _sizes_chi2_pvalue(sizes, n, 0.2) > ALPHA  # together: one Binomial(N, q) batch


@pytest.mark.parametrize("stop_after", [0, 3, 10])
def test_state_round_trip_continues_the_identical_stream(stop_after):
    sampler = PoissonBatchSampler(40, 0.1, steps=10, generator=0)
    it = iter(sampler)
    for _ in range(stop_after):
        next(it)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = list(it) + list(sampler) + list(sampler)

    resumed = PoissonBatchSampler(40, 0.1, steps=10, generator=123)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    restored = list(resumed) + list(resumed)
    # Mid-pass: the rest of that pass, then a full one. At a pass boundary: two full passes.
    assert len(restored) == (20 - stop_after if 0 < stop_after < 10 else 20)
    assert restored == expected[: len(restored)]


def test_state_from_a_different_setup_is_refused():
    state = PoissonBatchSampler(40, 0.1, generator=0).state_dict()
    with pytest.raises(ValueError, match=r"`state_dict\['sample_rate'\]`=0.1"):
        PoissonBatchSampler(40, 0.2, generator=0).load_state_dict(state)


def test_secure_mode_refuses_a_seed_and_draws_fresh_entropy():
    with pytest.raises(ValueError, match="`generator`=3.*secure mode"):
        PoissonBatchSampler(10, 0.1, generator=3, secure_mode=True)
    with pytest.raises(ValueError, match="`generator`"):
        PoissonBatchSampler(10, 0.1, generator=torch.Generator(), secure_mode=True)
    draw = lambda: list(PoissonBatchSampler(200, 0.5, steps=5, secure_mode=True))
    assert draw() != draw()


def test_secure_mode_batch_sizes_are_binomial():
    # Unseeded (OS entropy), so the threshold is tiny: a false alarm has probability 1e-6.
    sizes = [len(b) for b in PoissonBatchSampler(50, 0.1, steps=4000, secure_mode=True)]
    assert _sizes_chi2_pvalue(sizes, 50, 0.1) > 1e-6
    assert _sizes_chi2_pvalue(sizes, 50, 0.13) < 1e-6


def test_secure_mode_state_round_trip_keeps_the_position():
    sampler = PoissonBatchSampler(40, 0.1, steps=10, secure_mode=True)
    it = iter(sampler)
    next(it), next(it)
    state = sampler.state_dict()
    assert state["seed"] is None  # nothing to reproduce the stream from
    resumed = PoissonBatchSampler(40, 0.1, steps=10, secure_mode=True)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == 8


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"generator": -1}, "generator"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = {"num_samples": 10, "sample_rate": 0.1} | kwargs
    with pytest.raises(ValueError, match=f"`{name}`"):
        PoissonBatchSampler(**args)


@pytest.mark.parametrize("consumed", [0, 3, 9, 10, 13])
def test_state_at_the_consumed_batch_ignores_batches_drawn_ahead(consumed):
    """A data loader prefetches: the saved state must name the next batch to *train* on."""
    reference = PoissonBatchSampler(40, 0.1, steps=10, generator=5)
    stream = list(reference) + list(reference)
    sampler = PoissonBatchSampler(40, 0.1, steps=10, generator=5)
    it = iter(sampler)
    drawn = [next(it) for _ in range(min(consumed + 2, 10))]  # two batches of prefetch
    if consumed + 2 > 10:
        it = iter(sampler)
        drawn += [next(it) for _ in range(consumed + 2 - 10)]
    assert drawn == stream[: len(drawn)]
    state = sampler.state_dict(consumed=consumed)
    resumed = PoissonBatchSampler(40, 0.1, steps=10, generator=5)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert rest == stream[consumed : consumed + len(rest)]
    assert len(rest) == 10 - consumed % 10
