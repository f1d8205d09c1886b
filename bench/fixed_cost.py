"""The fixed cost of one private module: time and dispatched torch ops per step, next to non-private.

    python bench/fixed_cost.py
    python bench/fixed_cost.py --modules 64 --rounds 400
    python bench/fixed_cost.py --device cuda    # host time per module, as a LoRA model's

A stack of small modules (16 features, batch 16) makes every step's arithmetic negligible, so
what is left is what each private module costs whatever its size: the autograd.Function's
Python, the clipper's book-keeping, and the small ops on [B] vectors (norms, clip factors,
checks). It is paid once per private module per step: on a GPT at T=64 on the CPU it is a third
of the gap to non-private, and on an accelerator it is the host time that many small LoRA
modules add to a step. Ops are counted with a dispatch mode (exact, unlike the times on a noisy
host); times are medians over alternating rounds, as in ``paired.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import environment, synchronizer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

WIDTH, BATCH = 16, 16


def stack(kind: str, modules: int, device: str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    """``modules`` layers of one kind, and an input batch for them, on ``device``."""
    model, x = _stack(kind, modules)
    return model.to(device), x.to(device)


def _stack(kind: str, modules: int) -> tuple[nn.Module, torch.Tensor]:
    if kind == "linear T=1":
        return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(modules)]), torch.randn(BATCH, WIDTH)
    if kind == "linear T=8":  # ghost norms
        return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(modules)]), torch.randn(BATCH, 8, WIDTH)
    if kind == "linear T=64":  # instantiated per-example gradients
        return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(modules)]), torch.randn(BATCH, 64, WIDTH)
    if kind == "layer norm T=8":
        return nn.Sequential(*[nn.LayerNorm(WIDTH) for _ in range(modules)]), torch.randn(BATCH, 8, WIDTH)
    raise ValueError(f"fixed_cost.py: unknown kind {kind!r}")


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure(kind: str, modules: int, rounds: int, device: str = "cpu") -> dict[str, tuple[float, float]]:
    """(us per module per step, ops per module per step) of each case. On an accelerator a step
    is timed to the end of its kernels, which for modules this small is the host's time."""
    import lightning_dp

    sync = synchronizer(torch.device(device))
    steps = {}
    for case in ("non-private", "layer", "flat"):
        torch.manual_seed(0)
        model, x = stack(kind, modules, device)
        if case != "non-private":
            lightning_dp.make_private(model, clipping=case, max_grad_norm=1.0)

        def step(model=model, x=x) -> None:
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            sync()

        steps[case] = step
    times: dict[str, list[float]] = {case: [] for case in steps}
    for i in range(rounds + 10):
        for case, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= 10:
                times[case].append(time.perf_counter() - start)
    result = {}
    for case, step in steps.items():
        with _CountOps() as counter:
            step()
        result[case] = (1e6 * statistics.median(times[case]) / modules, counter.count / modules)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modules", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment(torch.device(args.device).type, args.threads) + "\n")
    print(f"{args.modules} modules of width {WIDTH}, batch {BATCH}; median of {args.rounds} alternating "
          "rounds. Per module per step (forward, backward, clipping):\n")
    print("| stack | non-private us | ops | per-layer us | ops | flat us | ops |\n|---|---|---|---|---|---|---|")
    for kind in ("linear T=1", "linear T=8", "linear T=64", "layer norm T=8"):
        r = measure(kind, args.modules, args.rounds, args.device)
        cells = " | ".join(f"{r[c][0]:.0f} | {r[c][1]:.1f}" for c in ("non-private", "layer", "flat"))
        print(f"| {kind} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
