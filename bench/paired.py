"""Step-time ratios measured in pairs: the cases' steps alternate in one process.

    python bench/paired.py --model gpt --seqs 64 128 256 512 1024 --cases non-private ldp-layer ldp-flat
    python bench/paired.py --model vit --cases non-private ldp-layer
    python bench/paired.py --model gpt --set d=192 layers=3 seq=96 batch=12 --threads 1

On a shared machine a busy spell lasts seconds, so cases run in separate processes minutes apart
(``suite.py``) can differ by 30% for nothing. Here every round times one step of each case back
to back, the ratio of each round is taken against the first case's step of that same round, and
the median over rounds is reported: a spell that slows one round slows both sides of its ratios.
Eager cases only (compiled ones would compile in the same process); memory is ``suite.py``'s job.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from cases import build_step
from harness import environment
from workloads import MODELS, PRESETS, TOKEN_MODELS, at_sequence_length, build, describe

EAGER_CASES = ("non-private", "ldp-layer", "ldp-unit", "ldp-flat", "opacus-hooks", "opacus-ghost")


def paired_ratios(model: str, shape: dict, cases: list[str], rounds: int, warmup: int) -> dict[str, dict]:
    """Median ms per case, and the median over rounds of each case's step / the first case's."""
    steps = {}
    for case in cases:
        net, inputs, targets = build(model, shape, shape["batch"], torch.device("cpu"))
        job = dict(case=case, max_grad_norm=1.0, optimizer="adam")
        steps[case], _ = build_step(job, net, inputs, targets)
    times: dict[str, list[float]] = {case: [] for case in cases}
    for i in range(warmup + rounds):
        for case in cases:
            start = time.perf_counter()
            steps[case]()
            if i >= warmup:
                times[case].append(time.perf_counter() - start)
    reference = times[cases[0]]
    return {case: dict(ms=1e3 * statistics.median(ts),
                       ratio=statistics.median(t / r for t, r in zip(ts, reference)))
            for case, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="gpt")
    parser.add_argument("--seqs", nargs="+", type=int, default=None, help="token models: these lengths")
    parser.add_argument("--cases", nargs="+", choices=EAGER_CASES, default=["non-private", "ldp-layer", "ldp-flat"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=INT",
                        help="override the preset shape, e.g. --set d=192 layers=3 seq=96 batch=12")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment("cpu", args.threads) + "\n")
    shapes = [{**PRESETS["cpu"][args.model], **_overrides(args.set)}]
    if args.seqs and args.model in TOKEN_MODELS:
        shapes = [at_sequence_length(shapes[0], seq) for seq in args.seqs]
    head = " | ".join(f"{case} ms | / {args.cases[0]}" for case in args.cases)
    print(f"Median of {args.rounds} alternating rounds after {args.warmup}\n")
    print(f"| shape | batch | {head} |\n|---|---|" + "---|---|" * len(args.cases))
    for shape in shapes:
        result = paired_ratios(args.model, shape, args.cases, args.rounds, args.warmup)
        cells = " | ".join(f"{result[c]['ms']:.1f} | {result[c]['ratio']:.2f}x" for c in args.cases)
        print(f"| {describe(args.model, shape)} | {shape['batch']} | {cells} |", flush=True)


def _overrides(pairs: list[str]) -> dict[str, int]:
    shape = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not value.isdigit():
            raise SystemExit(f"paired.py: --set {pair!r} is not KEY=INT (e.g. --set d=192 seq=96)")
        shape[key] = int(value)
    return shape


if __name__ == "__main__":
    main()
