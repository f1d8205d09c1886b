"""Trainer(strategy="dp", thresholds="adaptive"): thresholds move, are logged, charged, resumed."""

from __future__ import annotations

import math

import dp_accounting
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.rdp import RdpAccountant
from dp_fixtures import Classifier, flat_params, toy_dataset, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

import lightning_dp
from lightning_dp.accounting import LedgerEntry, effective_noise_multiplier, noise_multiplier_for
from lightning_dp.strategies import private_training

N, BATCH, SEED, GROUPS = 96, 12, 7, ["net.0", "net.2"]


class MemoryLogger(Logger):
    """Keeps every logged row, so per-step values can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))


def _fit(steps: int = 6, callbacks=(), ckpt_path=None, checkpointing=False, init_seed=0, **strategy_kwargs):
    settings = dict(thresholds="adaptive", noise_multiplier=1.0, count_noise_multiplier=3.0,
                    max_grad_norm=0.05, seed=SEED) | strategy_kwargs
    strategy = lightning_dp.DPStrategy(**settings)
    torch.manual_seed(init_seed)
    model = Classifier()
    t = trainer(strategy, callbacks=callbacks, max_steps=steps, max_epochs=-1,
                logger=MemoryLogger(), log_every_n_steps=1, enable_checkpointing=checkpointing)
    t.fit(model, DataLoader(toy_dataset(N), batch_size=BATCH), ckpt_path=ckpt_path)
    return t, strategy.private, model


def test_adaptive_run_moves_logs_and_charges_the_joint_release():
    accountant = lightning_dp.PrivacyAccountant(accountant="rdp")
    t, private, _ = _fit(callbacks=[accountant])
    history = private.adaptive.history
    assert sorted(history) == GROUPS and all(len(h) == 7 for h in history.values())
    for name in GROUPS:
        assert history[name][0] == 0.05 and history[name][-1] > 0.06  # grew toward the median
        logged = [row[f"dp/threshold/{name}"] for row in t.logger.rows if f"dp/threshold/{name}" in row]
        assert logged == pytest.approx(history[name][1:], rel=1e-6)  # after every step
        assert lightning_dp.group_thresholds(t.lightning_module)[name] == history[name][-1]

    sigma_eff = effective_noise_multiplier(1.0, 3.0, 2)
    q = BATCH / N
    assert private.ledger.history == (LedgerEntry("step", sigma_eff, q, 6),)
    joint = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(1.0),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2 * 3.0), 2),
    ]))
    want = RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(joint, 6)).get_epsilon(accountant.delta)
    assert accountant.epsilon == pytest.approx(want, rel=1e-9)

    # negative control: fixed thresholds stay put and the counts cost nothing
    _, fixed, _ = _fit(thresholds="fixed", count_noise_multiplier=None)
    assert fixed.adaptive is None and fixed.ledger.history == (LedgerEntry("step", 1.0, q, 6),)
    assert fixed.ledger.epsilon(accountant.delta) < accountant.epsilon


def test_target_epsilon_calibrates_sigma_eff_and_raises_the_gradient_sigma():
    accountant = lightning_dp.PrivacyAccountant(target_epsilon=3.0, accountant="rdp")
    _, private, _ = _fit(callbacks=[accountant], noise_multiplier=None, count_noise_multiplier=None)
    sigma_eff = noise_multiplier_for(target_epsilon=3.0, delta=accountant.delta, sample_rate=BATCH / N,
                                     steps=6, accountant="rdp")
    assert private.ledger.history[0].noise_multiplier == pytest.approx(sigma_eff, rel=1e-12)
    # default: the counts take 5% of the budget
    assert private.privacy.noise_multiplier == pytest.approx(sigma_eff / math.sqrt(0.95), rel=1e-9)
    assert private.ledger.steps == 6 and accountant.epsilon <= 3.0

    with pytest.raises(ValueError, match=r"`count_noise_multiplier`=0\.1 .*use up the whole privacy budget"):
        _fit(callbacks=[lightning_dp.PrivacyAccountant(target_epsilon=3.0, accountant="rdp")],
             noise_multiplier=None, count_noise_multiplier=0.1)


def test_micro_batches_give_identical_threshold_updates():
    results = []
    for size in (None, 5, 1):
        # C near the first layer's median norm, so counts are neither 0 nor the whole batch
        _, private, model = _fit(steps=5, max_physical_batch_size=size, max_grad_norm=1.2)
        results.append((private.adaptive.history, flat_params(model)))
        if size is None:
            stats = lightning_dp.engine.clipper_of(model).stats["net.0"]
            assert 0 < int(stats.clipped) < stats.norms.numel()
    for history, params in results[1:]:
        assert history == results[0][0]
        torch.testing.assert_close(params, results[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic"])
def test_each_step_is_noised_with_the_thresholds_that_clipped_it(monkeypatch, clip_fn):
    seen = []
    real = private_training.add_noise_and_normalize

    def spy(params, **kwargs):
        seen.append(kwargs["sensitivity"])
        real(params, **kwargs)

    monkeypatch.setattr(private_training, "add_noise_and_normalize", spy)
    _, private, _ = _fit(steps=4, clip_fn=clip_fn, initial_threshold={"net.0": 0.1, "net.2": 0.3})
    rows = list(zip(*private.adaptive.history.values()))
    assert rows[0] == (0.1, 0.3)  # initial_threshold, not max_grad_norm
    assert seen == [math.sqrt(sum(c * c for c in row)) for row in rows[:-1]]
    assert seen != [math.sqrt(sum(c * c for c in row)) for row in rows[1:]]  # not the updated ones


def test_automatic_clipping_scales_each_group_by_its_current_threshold():
    """Noise-free gradient, two steps: the second update is the oracle's automatic clipping of
    that batch at the thresholds the first step's counts produced."""
    from oracle import clipped_sum, per_example_grads

    captured = {}

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                plain = Classifier().net  # a non-private copy for the single-example oracle
                plain.load_state_dict(pl_module.net.state_dict())
                captured["net"], captured["batch"] = plain, batch

    _, private, model = _fit(steps=2, callbacks=[Capture()], noise_multiplier=0.0, clip_fn="automatic")
    x, y = captured["batch"]
    loss = lambda m, ex: F.cross_entropy(m(ex[0]), ex[1], reduction="sum")
    grads = per_example_grads(captured["net"], [(x[i : i + 1], y[i : i + 1]) for i in range(len(y))], loss)
    groups = {"net.0": ["0.weight", "0.bias"], "net.2": ["2.weight", "2.bias"]}
    at_step = {name: history[1] for name, history in private.adaptive.history.items()}
    assert at_step != {name: 0.05 for name in groups}
    expected, _ = clipped_sum(grads, groups, at_step, clip_fn="automatic")
    for name, p in captured["net"].named_parameters():
        want = p.detach() - 0.5 * expected[name] / BATCH  # Classifier's lr is 0.5
        torch.testing.assert_close(model.net.get_parameter(name).detach(), want, rtol=1e-5, atol=1e-6)


def test_resume_continues_with_the_saved_thresholds(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    _, private, model = _fit(steps=6, callbacks=[checkpoints], checkpointing=True)
    path = next(tmp_path.glob("*step=3*"))
    # a differently initialised model: everything must come from the file
    _, resumed, resumed_model = _fit(steps=6, ckpt_path=path, init_seed=1)
    assert resumed.adaptive.history == private.adaptive.history
    assert resumed.ledger.history == private.ledger.history
    torch.testing.assert_close(flat_params(resumed_model), flat_params(model), rtol=0, atol=0)

    # negative control: a run with fixed thresholds refuses the adaptive checkpoint
    with pytest.raises(ValueError, match=r"trained with thresholds='adaptive' but this run has thresholds='fixed'"):
        _fit(steps=6, ckpt_path=path, thresholds="fixed", count_noise_multiplier=None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_quantile=1.5), r"`target_quantile`=1\.5 is invalid.*\(0, 1\)"),
        (dict(threshold_lr=0.0), r"`threshold_lr`=0\.0 is invalid"),
        (dict(count_noise_multiplier=0.0), r"`count_noise_multiplier`=0\.0 is invalid"),
        (dict(thresholds="fixed", target_quantile=0.7, count_noise_multiplier=None),
         r"\{'target_quantile': 0\.7\} only apply to adaptive thresholds.*thresholds='adaptive'"),
        (dict(thresholds="sometimes"), r"thresholds='sometimes' is not 'fixed' or 'adaptive'"),
    ],
)
def test_bad_threshold_settings_are_refused_when_the_strategy_is_built(kwargs, match):
    settings = dict(thresholds="adaptive", noise_multiplier=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        lightning_dp.DPStrategy(**settings)
