"""Ghost norms against instantiation for one linear layer, per shape, on this device: is the
engine's ``choose_norm_method`` rule picking the faster one here?

    python bench/norm_methods.py                  # CPU, the grid below
    python bench/norm_methods.py --device cuda    # to set GHOST_WORK_PER_ELEMENT_ACCELERATOR

Each row times one layer's whole weight-and-bias clipping (norms, clip factors, clipped sums)
both ways, as a multiple of the non-private weight and bias gradient (``g^T x`` and ``sum g``),
and marks the shapes where ``choose_norm_method(..., "auto")`` picks the slower method, with
what that costs. The rule's constant is the multiply-adds one instantiated element is worth
(``lightning_dp/rules/norm_method.py``); a device whose rows are often marked needs another.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import time

import torch
from harness import environment, synchronizer

from lightning_dp.rules.norm_method import choose_norm_method

linear = importlib.import_module("lightning_dp.rules.linear")  # the package also exports linear()

TOKENS = ((16, 16), (16, 64), (8, 128), (4, 256), (2, 512))  # (batch, sequence length)
WIDTHS = ((128, 128), (384, 128), (512, 128), (128, 512), (2000, 128), (768, 768))  # (p, d)


def clip_one_layer(x: torch.Tensor, g: torch.Tensor, params: dict, method: str) -> None:
    use = linear.LinearUse(x, g, params, transposed=False, norm_method=method)
    scale = (use.norm_sq("weight") + use.norm_sq("bias")).sqrt().clamp(max=1.0)
    use.clipped_grad("weight", scale)
    use.clipped_grad("bias", scale)


def non_private(x: torch.Tensor, g: torch.Tensor) -> None:
    g.flatten(0, 1).t().mm(x.flatten(0, 1))
    g.sum((0, 1))


def best_ms(step, repeats: int, device: torch.device) -> float:
    """Best of three timings of ``repeats`` calls, after two warm-up calls."""
    sync = synchronizer(device)
    step(), step()
    best = float("inf")
    for _ in range(3):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(environment(device.type, args.threads) + "\n")
    print("| batch | T | p | d | non-private ms | ghost | instantiate | rule picks | rule's loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    params = {"weight": torch.zeros(1, device=device), "bias": torch.zeros(1, device=device)}
    for (batch, tokens), (p, d) in itertools.product(TOKENS, WIDTHS):
        x = torch.randn(batch, tokens, d, device=device)
        g = torch.randn(batch, tokens, p, device=device)
        repeats = max(3, int(2e8 / (batch * tokens * p * d)))
        base = best_ms(lambda x=x, g=g: non_private(x, g), repeats, device)
        ms = {m: best_ms(lambda m=m, x=x, g=g: clip_one_layer(x, g, params, m), repeats, device)
              for m in ("ghost", "instantiate")}
        picked = choose_norm_method(batch, tokens, p, d, "auto", device.type)
        loss = ms[picked] / min(ms.values()) - 1
        print(f"| {batch} | {tokens} | {p} | {d} | {base:.3f} | {ms['ghost'] / base:.2f}x | "
              f"{ms['instantiate'] / base:.2f}x | {picked} | {'' if loss < 0.02 else f'{loss:.0%}'} |")


if __name__ == "__main__":
    main()
