"""A running privacy ledger: what has been released so far, and its epsilon at any time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import dp_accounting

from lightning_dp.accounting._validation import (
    check_delta,
    check_noise_multiplier,
    check_num_samples,
    check_sample_rate,
    check_steps,
    fail,
)
from lightning_dp.accounting.adaptive import effective_noise_multiplier
from lightning_dp.accounting.analysis import (
    DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
    Accountant,
    check_accountant,
    composed_event,
    epsilon_of_runs,
)

__all__ = ["LedgerEntry", "PrivacyLedger"]

EntryKind = Literal["step", "gaussian"]


class LedgerEntry(NamedTuple):
    """A run of ``count`` identical releases of a (Poisson-subsampled) Gaussian mechanism.

    ``kind`` is ``"step"`` for DP-SGD steps (the gradient, jointly with any adaptive-threshold
    counts) and ``"gaussian"`` for extra releases with their own randomness. ``sample_rate``
    1.0 means the release saw the whole dataset (no subsampling).
    """

    kind: EntryKind
    noise_multiplier: float
    sample_rate: float
    count: int


class PrivacyLedger:
    """Records every release about the training data and reports the epsilon spent.

    Releases may change sigma or q mid-run; consecutive identical releases are stored as one
    run-length-encoded ``LedgerEntry``, and the dp_accounting event is rebuilt from the
    history on demand. Neighbouring datasets differ by adding or removing one example.

    Cost of ``epsilon(delta)``: results are cached until the next release. With
    ``accountant="rdp"`` a fresh answer costs microseconds (per-(sigma, q) curves are cached),
    so it can be called every step. With ``"pld"`` (tighter) each fresh answer recomposes the
    privacy loss distribution, typically 0.05-1 s at the default interval 1e-4 (about 10x less
    at 1e-3, slightly looser but never optimistic): query it every few hundred steps, or use
    RDP for logging and PLD for the final report.

    Args:
        accountant: ``"pld"`` or ``"rdp"``.
        value_discretization_interval: PLD grid step.
        num_samples: Dataset size N, if known: ``epsilon`` warns when delta >= 1/N.
    """

    def __init__(
        self,
        *,
        accountant: Accountant = "pld",
        value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
        num_samples: int | None = None,
    ) -> None:
        check_accountant(accountant, value_discretization_interval)
        self.accountant = accountant
        self.value_discretization_interval = value_discretization_interval
        self.num_samples = check_num_samples(num_samples)
        self._history: list[LedgerEntry] = []
        self._cache: dict[float, float] = {}

    def step(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        num_steps: int = 1,
        count_noise_multiplier: float | None = None,
        num_groups: int = 0,
    ) -> None:
        """Charge ``num_steps`` DP-SGD steps, each one Poisson-subsampled Gaussian release.

        Adaptive-threshold counts computed on the same batch (``num_groups`` centred counts
        with noise ``count_noise_multiplier``) are charged jointly with the gradient, as one
        Gaussian mechanism at ``effective_noise_multiplier(...)``, subsampled once. Do not
        charge them through ``compose_gaussian``: that would under-count.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        if num_groups:
            if count_noise_multiplier is None:
                fail("count_noise_multiplier", count_noise_multiplier,
                     f"num_groups={num_groups!r} noisy counts are released with each step",
                     "Pass the noise multiplier of the counts, or num_groups=0.")
            sigma = effective_noise_multiplier(sigma, count_noise_multiplier, num_groups)
        self._record("step", sigma, check_sample_rate(sample_rate),
                     check_steps(num_steps, "num_steps"))

    def compose_gaussian(
        self, noise_multiplier: float, *, sample_rate: float = 1.0, count: int = 1
    ) -> None:
        """Charge ``count`` extra Gaussian releases that draw their own randomness.

        For statistics computed on their own Poisson sample (``sample_rate`` < 1) or on the
        full dataset (``sample_rate=1.0``), e.g. a noisy evaluation metric. Counts computed on
        a training batch belong in ``step(count_noise_multiplier=..., num_groups=...)``.
        """
        self._record("gaussian", check_noise_multiplier(noise_multiplier),
                     check_sample_rate(sample_rate), check_steps(count, "count"))

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any release; inf if any was unnoised)."""
        delta = check_delta(delta, self.num_samples)
        if delta not in self._cache:
            runs = [(e.noise_multiplier, e.sample_rate, e.count) for e in self._history]
            self._cache[delta] = epsilon_of_runs(
                runs, delta, accountant=self.accountant,
                value_discretization_interval=self.value_discretization_interval)
        return self._cache[delta]

    def epsilon_after(self, delta: float, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon at ``delta`` once ``steps`` more DP-SGD steps at (``noise_multiplier``,
        ``sample_rate``) are charged after the history (which stays unchanged): what a plan can
        still afford when sigma or q differ from the steps already spent."""
        runs = [(e.noise_multiplier, e.sample_rate, e.count) for e in self._history]
        if steps > 0:
            last = self._history[-1] if self._history else None
            if last is not None and (last.kind, last.noise_multiplier, last.sample_rate) == (
                    "step", noise_multiplier, sample_rate):
                runs[-1] = (noise_multiplier, sample_rate, last.count + steps)  # one run, as charged
            else:
                runs.append((noise_multiplier, sample_rate, steps))
        return epsilon_of_runs(runs, check_delta(delta, self.num_samples), accountant=self.accountant,
                               value_discretization_interval=self.value_discretization_interval)

    @property
    def steps(self) -> int:
        """Number of DP-SGD steps charged so far."""
        return sum(e.count for e in self._history if e.kind == "step")

    @property
    def history(self) -> tuple[LedgerEntry, ...]:
        """All releases, oldest first, run-length encoded."""
        return tuple(self._history)

    @property
    def dp_event(self) -> dp_accounting.DpEvent:
        """The whole history as one dp_accounting event, for any dp_accounting accountant."""
        return composed_event((e.noise_multiplier, e.sample_rate, e.count) for e in self._history)

    def state_dict(self) -> dict[str, Any]:
        """The history as plain Python lists, safe for ``torch.save`` and checkpoints."""
        return {"history": [list(entry) for entry in self._history]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the history with a saved one, so a resumed run never forgets spent budget."""
        if not isinstance(state_dict, Mapping) or "history" not in state_dict:
            fail("state_dict", state_dict, "it has no 'history' entry",
                 "Pass the dict returned by PrivacyLedger.state_dict().")
        history = []
        for row in state_dict["history"]:
            if len(row) != 4 or row[0] not in ("step", "gaussian"):
                fail("state_dict", row, "a history row must be [kind, sigma, q, count] with "
                     "kind 'step' or 'gaussian'", "Pass an unmodified PrivacyLedger state.")
            history.append(LedgerEntry(row[0], check_noise_multiplier(row[1]),
                                       check_sample_rate(row[2]), check_steps(row[3], "count")))
        self._history = history
        self._cache.clear()

    def _record(self, kind: EntryKind, sigma: float, q: float, count: int) -> None:
        if count == 0:
            return
        last = self._history[-1] if self._history else None
        if last is not None and (last.kind, last.noise_multiplier, last.sample_rate) == (
                kind, sigma, q):
            self._history[-1] = last._replace(count=last.count + count)
        else:
            self._history.append(LedgerEntry(kind, sigma, q, count))
        self._cache.clear()
