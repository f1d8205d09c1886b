"""PNG plots for ``PrivacyReport`` (matplotlib's object API: no global pyplot state, no display)."""

from __future__ import annotations

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
    """Per-group fraction of clipped examples (top) and clipping thresholds (bottom)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5.5), layout="constrained")
    fractions, thresholds = figure.subplots(2, 1, sharex=True)
    for name, series in sorted(history.items()):
        for prefix, axes in (("dp/clip_fraction/", fractions), ("dp/threshold/", thresholds)):
            if name.startswith(prefix):
                axes.plot(*_unzip(series), label=name[len(prefix):], linewidth=1)
    fractions.set(ylabel="fraction clipped", title="Clipping per group", ylim=(-0.02, 1.02))
    thresholds.set(xlabel="step", ylabel="threshold C")
    for axes in (fractions, thresholds):
        axes.grid(alpha=0.3)
    if len(fractions.get_lines()) <= 12:
        fractions.legend(fontsize="x-small", ncols=2)
    figure.savefig(path, dpi=120)
    return path


def _unzip(series: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [s for s, _ in series], [v for _, v in series]
