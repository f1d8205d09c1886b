"""The engine under FSDP2 on 2 gloo ranks equals one process on the concatenated batch."""

from __future__ import annotations

import torch
from distributed import run_on_ranks
from fsdp_models import TinyTransformer, per_example_loss
import pytest
from fsdp_workers import BATCH, all_engine_checks, batch
from scipy import stats

import lightning_dp as ldp

SIGMA, EXPECTED, STEPS = 1.5, 4.0, 40


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every 2-rank check in one spawn; tests read what the ranks saved."""
    out = tmp_path_factory.mktemp("fsdp")
    run_on_ranks(all_engine_checks, 2, out, str(out), SIGMA, EXPECTED, STEPS)
    return out


UNITS = {"blocks.0": ["blocks.0"], "blocks.1": ["blocks.1"], "(root)": ["embed", "head"]}


def _single_process(clipping):
    torch.manual_seed(0)
    model = ldp.make_private(TinyTransformer(), clipping=clipping, max_grad_norm=0.5)
    per_example_loss(model, batch()).sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}, ldp.group_norms(model)


def test_two_ranks_equal_one_process_on_the_concatenated_batch(results):
    for clipping in ("unit", "layer"):
        _check_equal_to_single_process(results, clipping)


def _check_equal_to_single_process(tmp_path, clipping):
    ranks = [torch.load(tmp_path / f"{clipping}-rank{r}.pt", weights_only=True) for r in range(2)]
    want_grads, want_norms = _single_process(UNITS if clipping == "unit" else "layer")
    for name, want in want_grads.items():
        for rank in ranks:  # every rank holds the same full (summed) gradient
            torch.testing.assert_close(rank["grads"][name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert set(ranks[0]["norms"]) == set(want_norms)
    for group, want in want_norms.items():
        got = torch.cat([rank["norms"][group] for rank in ranks])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=group)
        assert got.shape == (BATCH,)


def test_self_check_across_ranks_equals_the_single_process_check(results):
    """Every rank gets the checking rank's engine norms and the reference norms summed from the
    shards; both equal the one-process self-check on the same examples, and clipping is
    exercised (norms above the threshold 0.5)."""
    ranks = [torch.load(results / f"self-check-rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0] == ranks[1]
    torch.manual_seed(0)
    model = ldp.make_private(TinyTransformer(), clipping=UNITS, max_grad_norm=0.5)
    share = BATCH // 2
    for case, rows in (("every rank", batch()[:share]), ("rank 1 only", batch()[share:])):
        engine, reference, examples = ranks[0][case]
        want = ldp.self_check(model, per_example_loss, rows)
        assert examples == want.examples == 3
        assert set(reference) == set(engine) == set(want.reference) == set(UNITS)
        for group, norms in want.reference.items():
            torch.testing.assert_close(torch.tensor(reference[group]), torch.tensor(norms), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(torch.tensor(engine[group]), torch.tensor(norms), rtol=1e-5, atol=1e-7)
        assert max(max(norms) for norms in want.reference.values()) > 0.5
    assert ranks[0]["no rank"] is None
    assert "self-check" in ranks[0]["mixing"] and "differ" in ranks[0]["mixing"]


def test_mixed_precision_policy_clips_with_float32_norms(results):
    """FSDP2 bf16 compute, fp32 reduction: norms accumulate in fp32 and match fp32 training."""
    ranks = [torch.load(results / f"unit-bf16-rank{r}.pt", weights_only=True) for r in range(2)]
    want_grads, want_norms = _single_process(UNITS)
    for group, want in want_norms.items():
        got = torch.cat([rank["norms"][group] for rank in ranks])
        assert got.dtype == torch.float32
        assert (want > 0.5).any()  # clipping is exercised
        torch.testing.assert_close(got, want, rtol=3e-2, atol=1e-3, msg=group)
    for name, want in want_grads.items():
        got = ranks[0]["grads"][name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=2e-2, msg=name)


def test_noise_variance_is_sigma_s_over_qn_on_each_coordinate_once(results):
    """Noise added on every rank (or scaled by 1/W, 1/sqrt(W)) changes the variance: rejected."""
    sigma, expected, steps = SIGMA, EXPECTED, STEPS
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(ranks[0]["samples"], ranks[1]["samples"])  # replicas agree
    samples = ranks[0]["samples"].flatten().double()
    std = sigma * ranks[0]["sensitivity"] / expected
    assert stats.kstest(samples.numpy() / std, "norm").pvalue > 1e-3
    for wrong in (std * 2**0.5, std / 2**0.5, std * 2, std / 2):  # noise on every rank, 1/sqrt(W), ...
        assert stats.kstest(samples.numpy() / wrong, "norm").pvalue < 1e-6
    per_step = ranks[0]["samples"]
    assert torch.unique(per_step, dim=0).shape[0] == steps  # fresh noise every step
    # rank 0 owns the first rows of each weight, rank 1 the rest: their streams must differ
    first_weight = per_step[:, : 8 * 17].reshape(steps, 17, 8)  # embed.weight, sharded on dim 0
    assert not torch.allclose(first_weight[:, :8], first_weight[:, 8:16])


def test_private_fsdp_uses_exactly_the_collectives_of_plain_fsdp(results):
    counts = torch.load(results / "counts-rank0.pt", weights_only=False)
    assert sum(counts["None"].values()) > 0, counts  # the counter sees FSDP's collectives
    assert counts["unit"] == counts["None"] and counts["layer"] == counts["None"], counts


@pytest.mark.slow
def test_compiled_blocks_on_two_ranks_equal_one_eager_process(tmp_path):
    from fsdp_workers import compiled_blocks_on_my_half

    run_on_ranks(compiled_blocks_on_my_half, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"compiled-rank{r}.pt", weights_only=True) for r in range(2)]
    want_grads, want_norms = _single_process(UNITS)
    for name, want in want_grads.items():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], want, rtol=1e-5, atol=1e-6, msg=name)
    for group, want in want_norms.items():
        torch.testing.assert_close(torch.cat([rank["norms"][group] for rank in ranks]), want, rtol=1e-5, atol=1e-6)


def test_block_types_that_match_no_module_are_refused_before_sharding():
    from torch import nn

    from lightning_dp.strategies.fsdp_sharding import shard_blocks

    with pytest.raises(ValueError, match=r"block_types=\['LSTM'\] match no module of TinyTransformer"):
        shard_blocks(TinyTransformer(), None, [nn.LSTM])
