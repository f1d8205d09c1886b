"""Gaussian noise: scale, normalisation by q*N, fresh draws per step and rank, secure mode."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from lightning_dp.noise import add_noise_and_normalize, make_noise_generator

SIGMA, SENSITIVITY = 1.3, 2.0
STD = SIGMA * SENSITIVITY


def _noise(generator, *, numel=20_000, dtype=torch.float32, expected_batch_size=1.0, secure_mode=False):
    p = torch.nn.Parameter(torch.zeros(numel, dtype=dtype))
    p.grad = torch.zeros_like(p)
    add_noise_and_normalize([p], noise_multiplier=SIGMA, sensitivity=SENSITIVITY,
                            expected_batch_size=expected_batch_size, generator=generator,
                            secure_mode=secure_mode)
    return p.grad


def _ks_pvalue(sample, scale):
    return stats.kstest(sample.double().numpy(), "norm", args=(0.0, scale)).pvalue


def test_noise_std_is_sigma_times_sensitivity():
    sample = _noise(make_noise_generator(0))
    assert _ks_pvalue(sample, STD) > 1e-3
    # Negative controls: the same test rejects a wrong scale.
    assert _ks_pvalue(sample, STD * 2 / 3) < 1e-6
    assert _ks_pvalue(sample, STD * 1.5) < 1e-6


def test_update_is_noisy_sum_over_expected_batch_size_whatever_the_realised_size():
    # The summed clipped gradient of any realised batch gets the same noise and divisor q*N.
    expected_batch_size = 12.5
    for realised in (0, 3, 40):
        summed = torch.full((1000,), float(realised))
        p = torch.nn.Parameter(torch.zeros(1000))
        p.grad = summed.clone()
        add_noise_and_normalize([p], noise_multiplier=SIGMA, sensitivity=SENSITIVITY,
                                expected_batch_size=expected_batch_size,
                                generator=make_noise_generator(4))
        noise = torch.randn(1000, generator=make_noise_generator(4)) * STD
        assert torch.allclose(p.grad, (summed + noise) / expected_batch_size)


def test_zero_noise_only_normalises():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([2.0, 4.0, 6.0])
    add_noise_and_normalize([p], noise_multiplier=0.0, sensitivity=1.0, expected_batch_size=2.0)
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


def test_empty_batch_creates_and_noises_missing_grads():
    model = torch.nn.Linear(50, 40)
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    assert all(p.grad is None for p in model.parameters())
    add_noise_and_normalize([*model.parameters(), frozen], noise_multiplier=SIGMA,
                            sensitivity=SENSITIVITY, expected_batch_size=4.0,
                            generator=make_noise_generator(1))
    weight = model.weight.grad
    assert weight is not None and model.bias.grad is not None and frozen.grad is None
    assert _ks_pvalue(weight.flatten(), STD / 4.0) > 1e-3


def test_a_frozen_parameter_holding_a_gradient_is_still_noised():
    """Frozen after the backward, its gradient is still stepped by the optimizer: noise it."""
    frozen = torch.nn.Parameter(torch.zeros(2000), requires_grad=False)
    frozen.grad = torch.zeros(2000)
    add_noise_and_normalize([frozen], noise_multiplier=SIGMA, sensitivity=SENSITIVITY,
                            expected_batch_size=4.0, generator=make_noise_generator(1))
    assert _ks_pvalue(frozen.grad, STD / 4.0) > 1e-3


def test_noise_is_fresh_every_step_and_independent_across_ranks():
    generator = make_noise_generator(0, rank=0)
    step1, step2 = _noise(generator), _noise(generator)
    other_rank = _noise(make_noise_generator(0, rank=1))
    bound = 5 / np.sqrt(step1.numel())  # |Pearson r| of independent samples ~ 1/sqrt(n)
    for a, b in [(step1, step2), (step1, other_rank)]:
        assert not torch.equal(a, b)
        assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < bound
    assert torch.equal(_noise(make_noise_generator(0, rank=1)), other_rank)  # reproducible


def test_low_precision_grads_draw_in_float32():
    for dtype in (torch.bfloat16, torch.float16):
        low = _noise(make_noise_generator(2), numel=1000, dtype=dtype, expected_batch_size=3.0)
        ref = _noise(make_noise_generator(2), numel=1000, expected_batch_size=3.0)
        assert low.dtype == dtype
        assert torch.equal(low, ref.to(dtype))
    double = _noise(make_noise_generator(2), numel=1000, dtype=torch.float64)
    assert double.dtype == torch.float64


def test_secure_mode():
    with pytest.raises(ValueError, match="`seed`=5.*secure mode"):
        make_noise_generator(5, secure_mode=True)
    a = _noise(make_noise_generator(secure_mode=True), secure_mode=True)
    b = _noise(make_noise_generator(secure_mode=True), secure_mode=True)
    assert not torch.equal(a, b)
    # Unseeded: thresholds chosen so a false alarm has probability ~1e-6.
    assert _ks_pvalue(a, STD) > 1e-6
    assert _ks_pvalue(a, STD * 1.5) < 1e-6
    assert _ks_pvalue(a, STD * 2 / 3) < 1e-6


def test_secure_draws_are_the_hardened_sum_of_two_float64_normals():
    generator = make_noise_generator(4)
    state = generator.get_state()
    hardened = _noise(generator, numel=1000, secure_mode=True)
    generator.set_state(state)
    draws = torch.randn((2, 1000), generator=generator, dtype=torch.float64)
    expected = ((draws.sum(0) / 2**0.5).float() * STD)
    torch.testing.assert_close(hardened, expected)
    generator.set_state(state)
    assert not torch.equal(_noise(generator, numel=1000), hardened)  # not the plain draw


def test_default_seed_follows_torch_global_seed():
    torch.manual_seed(3)
    first = _noise(make_noise_generator())
    torch.manual_seed(3)
    assert torch.equal(_noise(make_noise_generator()), first)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"sensitivity": 0.0}, "sensitivity"),
        ({"expected_batch_size": 0.0}, "expected_batch_size"),
        ({"expected_batch_size": float("inf")}, "expected_batch_size"),
    ],
)
def test_bad_arguments(kwargs, name):
    p = torch.nn.Parameter(torch.zeros(3))
    args = {"noise_multiplier": 1.0, "sensitivity": 1.0, "expected_batch_size": 1.0} | kwargs
    with pytest.raises(ValueError, match=f"`{name}`"):
        add_noise_and_normalize([p], **args)


@pytest.mark.parametrize(("kwargs", "name"), [({"seed": -1}, "seed"), ({"rank": -1}, "rank")])
def test_bad_generator_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make_noise_generator(**kwargs)


def _sharded_noise_worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        p = torch.nn.Parameter(distribute_tensor(torch.zeros(4000, 5), mesh, [Shard(0)]))
        add_noise_and_normalize([p], noise_multiplier=SIGMA, sensitivity=SENSITIVITY,
                                expected_batch_size=2.0, generator=make_noise_generator(0, rank=rank))
        assert p.grad.to_local().shape == (4000 // world_size, 5)
        full = p.grad.full_tensor()
        if rank == 0:
            torch.save(full, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawned children re-import lightning_dp (and Lightning): ~25 s
def test_sharded_grads_get_noise_once_per_coordinate_from_independent_rank_streams(tmp_path):
    out_file = tmp_path / "full.pt"
    mp.start_processes(_sharded_noise_worker, args=(2, tmp_path / "init", out_file), nprocs=2,
                       join=True, start_method="spawn")
    full = torch.load(out_file)
    shard0, shard1 = full[:2000].flatten(), full[2000:].flatten()
    # Every coordinate noised exactly once at std sigma*S/(qN): not 0, not sqrt(2)x, not 1/W.
    assert _ks_pvalue(full.flatten(), STD / 2.0) > 1e-3
    assert _ks_pvalue(full.flatten(), STD / 2.0 * 2**0.5) < 1e-6
    assert abs(np.corrcoef(shard0.numpy(), shard1.numpy())[0, 1]) < 5 / np.sqrt(shard0.numel())


@pytest.fixture
def single_rank_mesh(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_dtensor_grad_is_noised_on_its_local_shard(single_rank_mesh):
    p = torch.nn.Parameter(distribute_tensor(torch.zeros(4000, 5), single_rank_mesh, [Shard(0)]))
    add_noise_and_normalize([p], noise_multiplier=SIGMA, sensitivity=SENSITIVITY,
                            expected_batch_size=2.0, generator=make_noise_generator(0))
    assert isinstance(p.grad, type(p.data)) and p.grad.placements == (Shard(0),)
    assert _ks_pvalue(p.grad.to_local().flatten(), STD / 2.0) > 1e-3


def test_dtensor_grads_refuse_the_default_generator_and_non_shard_placements(single_rank_mesh):
    sharded = torch.nn.Parameter(distribute_tensor(torch.zeros(8, 2), single_rank_mesh,
                                                   [Shard(0)]))
    with pytest.raises(ValueError, match="`generator`=None.*per-rank"):
        add_noise_and_normalize([sharded], noise_multiplier=1.0, sensitivity=1.0,
                                expected_batch_size=1.0)
    replicated = torch.nn.Parameter(distribute_tensor(torch.zeros(8, 2), single_rank_mesh,
                                                      [Replicate()]))
    with pytest.raises(ValueError, match=r"`params\[0\].grad.placements`"):
        add_noise_and_normalize([replicated], noise_multiplier=1.0, sensitivity=1.0,
                                expected_batch_size=1.0, generator=make_noise_generator(0))
