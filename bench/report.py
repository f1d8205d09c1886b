"""Markdown tables and PNG plots of suite results (the parent process; no torch needed)."""

from __future__ import annotations

from typing import Any

from harness import best_round


def _reference(case: str) -> str:
    """The non-private case a case is compared with: compiled vs compiled, eager vs eager."""
    return "non-private-compiled" if case.endswith("-compiled") else "non-private"


def _ratio(value: float | None, ref: float | None) -> str:
    return f"{value / ref:.2f}x" if value is not None and ref else "n/a"


def compare_table(title: str, rounds: dict[str, list[dict]], budget_mib: float | None) -> str:
    """One model's table: time, memory and largest batch of every case, with ratios."""
    best = {case: best_round(rs) for case, rs in rounds.items()}
    budget = f" (training memory ≤ {budget_mib:.0f} MiB)" if budget_mib else ""
    lines = [
        f"### {title}", "",
        ("| case | ms/step | vs non-private | CPU ms/step | vs non-private | training MiB "
         f"| vs non-private | largest batch{budget} | vs non-private "
         "| every round: median ms (CPU stall) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, r in best.items():
        if "error" in r:
            lines.append(f"| {case} | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        ref = best.get(_reference(case), {})
        spread = ", ".join(f"{x['ms']:.0f} ({x['stall']:.0f}%)" if "error" not in x else "failed"
                           for x in rounds[case])
        largest = r.get("largest_batch")
        memory = r.get("training_mib")
        memory_cell = f"{memory:.1f} ({r['memory_kind']})" if memory is not None else "-"
        lines.append(
            f"| {case} | {r['ms']:.1f} | {_ratio(r['ms'], ref.get('ms'))} | {r['cpu_ms']:.1f} "
            f"| {_ratio(r['cpu_ms'], ref.get('cpu_ms'))} "
            f"| {memory_cell} "
            f"| {_ratio(memory, ref.get('training_mib'))} | {largest if largest is not None else '-'} "
            f"| {_ratio(largest, ref.get('largest_batch'))} | {spread} |")
    return "\n".join(lines)


def scaling_table(title: str, results: dict[tuple[int, int], dict[str, dict]], methods: list[str], unit: str) -> str:
    """Step time and memory of each norm method per (sequence length, batch size)."""
    head = " | ".join(f"{m} {what}" for what in ("ms", "CPU ms", f"peak - base {unit}") for m in methods)
    lines = [f"### {title}", "", f"| seq | batch | {head} | CPU stall % |",
             "|---|---|" + "---|" * (3 * len(methods)) + "---|"]
    for (seq, batch), by_method in sorted(results.items()):
        cells = " | ".join(_cell(by_method[m], what) for what in ("ms", "cpu_ms", "mem") for m in methods)
        stall = max((r["stall"] for r in by_method.values() if "error" not in r), default=float("nan"))
        lines.append(f"| {seq} | {batch} | {cells} | {stall:.0f} |")
    return "\n".join(lines)


def _cell(r: dict, what: str) -> str:
    if "error" in r:
        return "failed"
    return f"{r[what]:.1f}" if what in ("ms", "cpu_ms") else f"{r['peak'] - r['base']:.0f}"


def plot_compare(path: str, results: dict[str, dict[str, list[dict]]], time_key: str = "ms") -> None:
    """Bars per model: step time vs non-private (top) and peak - base memory (bottom).

    ``time_key`` is ``"ms"`` (wall) or ``"cpu_ms"`` (process CPU time, for shared CPUs)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
    for col, (model, rounds) in enumerate(results.items()):
        best = {c: best_round(rs) for c, rs in rounds.items()}
        ok = {c: r for c, r in best.items() if "error" not in r}
        ref = best.get("non-private", {}).get(time_key)
        cases = list(ok)
        axes[0][col].bar(cases, [ok[c][time_key] / ref if ref else 0 for c in cases])
        axes[0][col].axhline(1.0, color="grey", lw=0.8)
        axes[0][col].set_title(model)
        axes[0][col].set_ylabel(f"{'CPU' if time_key == 'cpu_ms' else 'wall'} time / non-private")
        axes[1][col].bar(cases, [ok[c]["training_mib"] for c in cases], color="tab:orange")
        axes[1][col].set_ylabel("training memory (MiB)")
        for ax in axes[:, col]:
            ax.tick_params(axis="x", labelrotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_scaling(path: str, results: dict[tuple[int, int], dict[str, dict]], methods: list[str],
                 time_key: str = "ms") -> None:
    """Step time and memory vs sequence length, one line per (method, batch size)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for batch in sorted({b for _, b in results}):
        seqs = sorted(s for s, b in results if b == batch)
        for method in methods:
            rows = [results[(s, batch)][method] for s in seqs]
            xs = [s for s, r in zip(seqs, rows) if "error" not in r]
            ok = [r for r in rows if "error" not in r]
            axes[0].plot(xs, [r[time_key] for r in ok], marker="o", label=f"{method}, batch {batch}")
            axes[1].plot(xs, [r["peak"] - r["base"] for r in ok], marker="o", label=f"{method}, batch {batch}")
    time_label = "CPU ms / step" if time_key == "cpu_ms" else "ms / step"
    for ax, label in zip(axes, (time_label, "peak - base memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
