"""``PrivacyReport``: at the end of training, say what was spent and how clipping behaved.

It records, every step, the metrics ``PrivacyAccountant`` logs (``epsilon``,
``dp/clip_fraction/<group>``, ``dp/threshold/<group>``) and, when training ends, prints a short
report (the privacy card: epsilon, delta, sigma, q, steps, clipping, accountant) and writes
``privacy_report.json``, ``privacy_report.md`` and PNG plots of epsilon and of the per-group
clip fractions and thresholds against the step.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from lightning_dp.callbacks.report_plots import plot_clipping, plot_epsilon
from lightning_dp.exporting.card import privacy_card

_PREFIXES = ("epsilon", "dp/clip_fraction/", "dp/within_fraction/", "dp/threshold/")


class PrivacyReport(Callback):
    """Write the privacy report and its plots when training ends.

    Args:
        dirpath: where the files go; default the Trainer's log directory (or its
            ``default_root_dir`` without a logger).
        plots: draw the PNG plots (needs matplotlib: ``pip install "lightning-dp[examples]"``).
    """

    def __init__(self, dirpath: str | None = None, plots: bool = True) -> None:
        if plots:
            try:
                import matplotlib  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "PrivacyReport(plots=True) draws with matplotlib, which is not installed; "
                    "pip install matplotlib (or lightning-dp[examples]), or pass plots=False."
                ) from error
        self.dirpath = dirpath
        self.plots = plots
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.card: dict[str, Any] | None = None
        self.files: list[Path] = []
        self._last_recorded = 0

    # The metrics of step k are read when step k+1 starts (or training ends): by then every
    # callback has logged them, whatever the order of the Trainer's callbacks.
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._record(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)
        self.card = privacy_card(trainer)
        rank_zero_info(render_text(self.card))
        self._write(trainer)

    def _record(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step == 0 or self._last_recorded == step:
            return
        self._last_recorded = step
        for name, value in trainer.callback_metrics.items():
            if name.startswith(_PREFIXES):
                self.history[name].append((step, float(value)))

    @rank_zero_only
    def _write(self, trainer: pl.Trainer) -> None:
        out = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = {"card": self.card, "history": dict(self.history)}
        self.files = [out / "privacy_report.json", out / "privacy_report.md"]
        self.files[0].write_text(json.dumps(report, indent=2) + "\n")
        self.files[1].write_text(render_markdown(self.card))
        if self.plots:
            self.files += [plot_epsilon(self.history, out / "epsilon.png"),
                           plot_clipping(self.history, out / "clipping.png")]
        rank_zero_info(f"lightning-dp: privacy report written to {out}")


def render_text(card: dict[str, Any]) -> str:
    """The few lines printed at the end of training."""
    rates = card["sample_rates"]
    q = (f"{card['sample_rate']:.4g}" if len(rates) <= 1
         else ", ".join(f"{rate:.4g} ({steps} steps)" for rate, steps in rates))
    return (
        f"lightning-dp privacy report: ({card['epsilon']:.4g}, {card['delta']:.3g})-DP "
        f"[{card['accountant']}, {card['neighbouring_relation']}]\n"
        f"  sigma={card['noise_multiplier']:.4g}  q={q}  steps={card['steps']}  "
        f"N={card['dataset_size']}\n"
        f"  clipping={card['clipping']} ({card['clip_fn']}), {len(card['thresholds'])} groups, "
        f"sensitivity={card['sensitivity']:.4g}"
    )


def render_markdown(card: dict[str, Any]) -> str:
    """The card as a Markdown table, thresholds last."""
    rows = [(k, v) for k, v in card.items() if k not in ("thresholds", "releases")]
    lines = ["# Privacy report", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Clipping thresholds per group", "", "| group | C |", "|---|---|"]
    lines += [f"| {g} | {c:.4g} |" for g, c in card["thresholds"].items()]
    return "\n".join(lines) + "\n"
