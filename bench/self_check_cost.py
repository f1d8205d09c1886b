"""What the first-step self-check costs, once: ``lightning_dp.self_check`` vs one private step.

One private step here is forward, per-example-summed loss and backward through the clipping
engine (what every DP step does before noise); the self-check runs one such pass on the whole
batch plus one plain single-example pass for each checked example. Both on the same model and
batch, the median of ``--repeats`` runs each, interleaved.

    python bench/self_check_cost.py [--model gpt|vit|cnn] [--examples 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lightning_dp as ldp  # noqa: E402
from models import per_example_loss  # noqa: E402
from workloads import PRESETS, build, describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt", "vit", "cnn"), default="gpt")
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = dict(PRESETS["cpu"][args.model])
    model, inputs, targets = build(args.model, shape, shape["batch"], "cpu")
    ldp.make_private(model)

    def loss_fn(m, batch):
        x, y = batch
        return per_example_loss(m(x), y)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, (inputs, targets)).sum().backward()

    def check() -> None:
        ldp.self_check(model, loss_fn, (inputs, targets), num_examples=args.examples)

    timings: dict[str, list[float]] = {"private step": [], "self-check": []}
    step(), check()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("private step", step), ("self-check", check)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    medians = {name: 1000 * statistics.median(t) for name, t in timings.items()}
    print(f"{describe(args.model, shape)}, batch {shape['batch']}, {args.examples} examples checked, "
          f"torch {torch.__version__}, {args.threads} threads")
    print("| pass | ms (median) | vs private step |\n|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {ms / medians['private step']:.2f}x |")


if __name__ == "__main__":
    main()
