"""The engine at an earlier commit against the working tree, in one process, steps alternating.

    python bench/versus.py --base eea4953 --model gpt --seq 64
    python bench/versus.py --base HEAD~3 --stack "linear T=64" --clipping flat --threads 1

A change to the engine that saves 1-5% of a step cannot be seen by timing the two commits in
separate processes on a shared host (a whole process can run 30% fast or slow, bench/RESULTS.md).
Here ``lightning_dp`` at ``--base`` is unpacked with ``git archive`` and imported under another
name, beside the working tree's, and every round times a non-private step, the old private step
and the new one back to back. Reported: medians of each round's ratios, and the largest
difference between the two versions' gradients after the first step (they must agree up to
rounding; anything more is a change of result, not of speed).
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from fixed_cost import WIDTH, stack
from harness import environment
from models import per_example_loss
from workloads import PRESETS, TOKEN_MODELS, at_sequence_length, build, describe

BASE_NAME = "lightning_dp_base"


def import_at(rev: str) -> ModuleType:
    """``lightning_dp`` as it was at ``rev``, importable beside the working tree's."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", rev, "lightning_dp"], cwd=root, capture_output=True, check=True).stdout
    target = Path(tempfile.mkdtemp(prefix="versus-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    (target / "lightning_dp").rename(target / BASE_NAME)
    for path in (target / BASE_NAME).rglob("*.py"):
        path.write_text(re.sub(r"\blightning_dp\b", BASE_NAME, path.read_text()))
    sys.path.insert(0, str(target))
    return importlib.import_module(BASE_NAME)


def model_step(engine: ModuleType | None, args: argparse.Namespace):
    """One training step's closure (forward, backward, Adam) and the model it trains."""
    torch.manual_seed(0)
    if args.stack:
        net, x = stack(args.stack, args.modules)
        if engine is not None:
            engine.make_private(net, clipping=args.clipping, max_grad_norm=1.0)

        def loss() -> torch.Tensor:
            return net(x).square().sum()
    else:
        shape = dict(PRESETS["cpu"][args.model])
        if args.model in TOKEN_MODELS and args.seq:
            shape = at_sequence_length(shape, args.seq)
        net, x, y = build(args.model, shape, shape["batch"], torch.device("cpu"))
        if engine is not None:
            engine.make_private(net, clipping=args.clipping, max_grad_norm=1.0)

        def loss() -> torch.Tensor:
            return per_example_loss(net(x), y).sum()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step, net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--model", choices=sorted(PRESETS["cpu"].keys() - {"budget_mib"}), default="gpt")
    parser.add_argument("--seq", type=int, default=None, help="token models: this sequence length")
    parser.add_argument("--stack", default=None, help=f"a fixed_cost.py stack instead, e.g. 'linear T=64' (width {WIDTH})")
    parser.add_argument("--modules", type=int, default=32, help="modules in a --stack")
    parser.add_argument("--clipping", default="layer", choices=["layer", "flat", "unit"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import lightning_dp

    base = import_at(args.base)
    print(environment("cpu", args.threads))
    label = f"stack of {args.modules} x '{args.stack}'" if args.stack else describe(args.model, at_sequence_length(
        PRESETS["cpu"][args.model], args.seq) if args.seq else PRESETS["cpu"][args.model])
    print(f"{label}, clipping={args.clipping}, {args.base} (old) against the working tree (new)")

    steps, nets = {}, {}
    for name, engine in (("non-private", None), ("old", base), ("new", lightning_dp)):
        steps[name], nets[name] = model_step(engine, args)
    steps["old"](), steps["new"]()
    difference = max((float((a.grad - b.grad).abs().max()) for a, b in
                      zip(nets["old"].parameters(), nets["new"].parameters()) if a.grad is not None), default=0.0)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"largest |old - new| gradient entry after one step: {difference:.3g}")
    print(f"non-private {1e3 * statistics.median(times['non-private']):.2f} ms; "
          f"old {ratio('old', 'non-private'):.3f}x, new {ratio('new', 'non-private'):.3f}x; "
          f"new / old {ratio('new', 'old'):.3f} (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
