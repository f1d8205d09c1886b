"""What the compiled parameters' leak guard costs per step: ``lightning_dp.compile`` with the
guard against the same compiled model with it switched off, steps alternating in one process.

The guard walks the autograd graph from the compiled output at every forward to find the
compiled graphs' backward nodes, keeps their parameter gradients with a post-hook, and checks
each parameter's incoming gradient against them with a tensor hook
(``engine/compiled_guard.py``). Switched off here: the walk and the hooks' checks (the hooks
stay registered, so what is measured is the work, not the hook dispatch).

    python bench/compiled_guard_cost.py [--model gpt|vit|cnn] [--seq 64] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lightning_dp  # noqa: E402
import lightning_dp.compiling as compiling  # noqa: E402
from cases import build_step  # noqa: E402
from lightning_dp.engine.make_private import _CompiledLeakGuard  # noqa: E402
from workloads import PRESETS, at_sequence_length, build, describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt", "vit", "cnn"), default="gpt")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--clipping", choices=("layer", "flat"), default="layer")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = dict(PRESETS["cpu"][args.model])
    if args.seq:
        shape = at_sequence_length(shape, args.seq)
    model, inputs, targets = build(args.model, shape, shape["batch"], "cpu")
    job = dict(case=f"ldp-{args.clipping}-compiled", max_grad_norm=1.0, optimizer="adam")
    step, _ = build_step(job, model, inputs, targets)
    guarded = {"watch": compiling.watch_compiled_graphs, "check": _CompiledLeakGuard.__call__}

    def switch(on: bool) -> None:
        compiling.watch_compiled_graphs = guarded["watch"] if on else (lambda *args: None)
        _CompiledLeakGuard.__call__ = guarded["check"] if on else (lambda *args: None)

    for on in (True, False, True, False):  # compile and warm up both ways
        switch(on)
        step()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (True, False):
            switch(on)
            start = time.perf_counter()
            step()
            times[on].append(time.perf_counter() - start)
    switch(True)
    guard, bare = (1000 * statistics.median(times[on]) for on in (True, False))
    ratios = [a / b for a, b in zip(times[True], times[False])]
    params = sum(1 for p in model.parameters() if p.requires_grad)
    print(f"{describe(args.model, shape)}, batch {shape['batch']}, {args.clipping} clipping, "
          f"{params} parameters, torch {torch.__version__}, lightning_dp {lightning_dp.__file__}")
    print(f"compiled step with the guard {guard:.2f} ms, without {bare:.2f} ms; "
          f"median ratio of rounds {statistics.median(ratios):.3f} ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
