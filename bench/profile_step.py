"""Where a case's training step spends its time, next to non-private: torch.profiler self CPU
(or CUDA) time per op, per step, for each case in one process, and the ops that differ most.

    python bench/profile_step.py --model gpt --cases non-private ldp-layer ldp-flat [--seq 512]

Each case is built fresh (same seed, same batch), warmed up, then profiled over ``--steps``
steps. The table lists, per op, milliseconds per step in every case, sorted by how much more the
slowest private case spends on it than non-private; "total" is the sum over all ops. Profiling
adds a fixed cost per op call, so compare the rows, not the totals, with ``bench/suite.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import CASES, build_step  # noqa: E402
from workloads import MODELS, PRESETS, at_sequence_length, build, describe  # noqa: E402


def main() -> None:
    args = parse_args()
    import torch

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shape = PRESETS[args.preset][args.model]
    if args.seq:
        shape = at_sequence_length(shape, args.seq)
    per_case = {case: profile_case(args, case, shape, device) for case in args.cases}
    print(f"{describe(args.model, shape)}, batch {shape['batch']}, {args.device}; "
          f"self time per step (ms) over {args.steps} profiled steps after {args.warmup} warm-up\n")
    print(table(per_case, args.cases, args.rows))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="gpt")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=["non-private", "ldp-layer", "ldp-flat"])
    parser.add_argument("--seq", type=int, default=None, help="token models: this sequence length")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=20, help="ops to list")
    args = parser.parse_args()
    args.preset = args.preset or ("gpu-h100" if args.device == "cuda" else "cpu")
    if "non-private" not in args.cases:
        args.cases = ["non-private", *args.cases]
    return args


def profile_case(args: argparse.Namespace, case: str, shape: dict, device) -> dict[str, float]:
    """Self time (ms per step) of every op name in ``case``'s step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, inputs, targets = build(args.model, shape, shape["batch"], device)
    job = dict(case=case, max_grad_norm=args.max_grad_norm, optimizer=args.optimizer)
    step, _ = build_step(job, model, inputs, targets)
    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        times[event.key] += us / 1e3 / args.steps
    return dict(times)


def table(per_case: dict[str, dict[str, float]], cases: list[str], rows: int) -> str:
    private = [c for c in cases if c != "non-private"]
    ops = set().union(*per_case.values())
    base = per_case["non-private"]

    def extra(op: str) -> float:
        return max(per_case[c].get(op, 0.0) for c in private) - base.get(op, 0.0)

    lines = ["| op | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    lines.append("| **total** | " + " | ".join(f"{sum(per_case[c].values()):.1f}" for c in cases) + " |")
    for op in sorted(ops, key=extra, reverse=True)[:rows]:
        name = op if len(op) <= 60 else op[:57] + "..."
        lines.append(f"| `{name}` | " + " | ".join(f"{per_case[c].get(op, 0.0):.2f}" for c in cases) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
