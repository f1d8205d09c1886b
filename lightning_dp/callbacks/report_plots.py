"""PNG plots for ``PrivacyReport`` (matplotlib's object API: no global pyplot state, no display)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

Series = Mapping[str, Sequence[tuple[int, float]]]


def plot_epsilon(history: Series, path: Path) -> Path:
    """Epsilon spent against the optimizer step."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.2), layout="constrained")
    axes = figure.add_subplot()
    steps, values = _unzip(history.get("epsilon", ()))
    axes.plot(steps, values, drawstyle="steps-post")
    axes.set(xlabel="step", ylabel="epsilon", title="Privacy spent")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return path


def plot_clipping(history: Series, path: Path) -> Path:
    """Per-group fraction of examples clipped (top) and clipping thresholds (bottom).

    The top panel shows the raw clip fractions when they were logged (``log_clip_fraction``,
    not private), else the noisy fraction within the threshold released by adaptive thresholds.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5.5), layout="constrained")
    fractions, thresholds = figure.subplots(2, 1, sharex=True)
    raw = any(name.startswith("dp/clip_fraction/") for name in history)
    top = "dp/clip_fraction/" if raw else "dp/within_fraction/"
    for name, series in sorted(history.items()):
        for prefix, axes in ((top, fractions), ("dp/threshold/", thresholds)):
            if name.startswith(prefix):
                steps, values = _unzip(series)
                axes.plot(steps, values if raw else [1 - v for v in values], label=name[len(prefix):], linewidth=1)
    label = "fraction clipped" if raw else "fraction clipped (noisy)"
    fractions.set(ylabel=label, title="Clipping per group", ylim=(-0.02, 1.02))
    if not fractions.get_lines():
        fractions.text(0.5, 0.5, "clip fractions not logged: they are not private\n"
                       "(PrivacyAccountant(log_clip_fraction=True) to see them)",
                       ha="center", va="center", transform=fractions.transAxes, fontsize="small")
    thresholds.set(xlabel="step", ylabel="threshold C")
    for axes in (fractions, thresholds):
        axes.grid(alpha=0.3)
    groups = len(fractions.get_lines())
    if 0 < groups <= 40:  # beyond that a legend is unreadable; the JSON report has every series
        figure.set_figwidth(6 + 1.5 * math.ceil(groups / 20))
        fractions.legend(fontsize="x-small", ncols=math.ceil(groups / 20), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path, dpi=120)
    return path


def _unzip(series: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [s for s, _ in series], [v for _, v in series]
