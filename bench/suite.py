"""Side-by-side benchmark suite: non-private vs lightning-dp vs Opacus on three models.

    python bench/suite.py compare [--preset cpu|gpu-h100|gpu-h200] [--models cnn gpt vit] ...
    python bench/suite.py compare --models gpt --seqs 64 128 256 512 1024   # one table per T
    python bench/suite.py scaling [--preset ...] [--seqs 32 128 512] [--batches 4 16] ...

``compare`` runs every case of bench/cases.py on each model (bench/workloads.py) in one fresh
process per case and round (bench/harness.py), and reports the median step time after warm-up,
process CPU time per step (robust when other processes share the cores), training memory (model,
optimizer state, batch, activations, gradients; on CPU as tensor bytes, see ``training_memory``),
the largest batch whose training memory fits ``--memory-budget-mib`` (doubling then bisection
within the case's process, for ``--search-cases``; 0 turns it off) and ratios to non-private training
(compiled cases against compiled non-private). ``scaling`` times per-layer clipping of the GPT
with each ``norm_method`` (ghost norm, per-example instantiation, auto) over a grid of sequence
lengths and batch sizes, next to non-private training, so the ghost/instantiation crossover
(DESIGN §3: ghost wins when 2T^2 < p*d) shows. Both write Markdown and a PNG plot to ``--out``
and print the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cases import CASES, build_step, unavailable
from harness import (
    environment,
    largest_batch,
    memory_mib,
    release_free_memory,
    reset_peak,
    spawn,
    time_steps,
)
from tensor_bytes import TensorBytes
from report import compare_table, plot_compare, plot_scaling, scaling_table
from workloads import MODELS, PRESETS, TOKEN_MODELS, at_sequence_length, build, describe

NORM_METHODS = ("ghost", "instantiate", "auto")
SCALING = {  # sequence lengths and batch sizes of the scaling grid, per preset
    "cpu": dict(seqs=[32, 128, 512], batches=[4, 16]),
    "gpu-h100": dict(seqs=[128, 256, 512, 1024, 2048], batches=[8, 32]),
}
SCALING["gpu-h200"] = SCALING["gpu-h100"]


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    print(environment(args.device, args.threads) + "\n")
    if args.command == "compare":
        compare(args)
    else:
        scaling(args)


def parse_args() -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    common.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="sizes; default cpu on cpu, gpu-h100 on cuda")
    common.add_argument("--warmup", type=int, default=3)
    common.add_argument("--steps", type=int, default=10)
    common.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per case; tables keep the best round")
    common.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    common.add_argument("--max-grad-norm", type=float, default=1.0)
    common.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    common.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    sub = parser.add_subparsers(dest="command")
    cmp = sub.add_parser("compare", parents=[common], help="every case on every model")
    cmp.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    cmp.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    cmp.add_argument("--memory-budget-mib", type=float, default=None,
                     help="budget of the largest-batch search; default the preset's, 0 = off")
    cmp.add_argument("--seqs", nargs="+", type=int, default=None,
                     help="token models at these sequence lengths (same tokens per batch; one "
                          "layer from 512 on), one table each")
    cmp.add_argument("--batch-limit", type=int, default=4096, help="largest batch the search tries")
    cmp.add_argument("--search-cases", nargs="+", choices=CASES, default=list(CASES),
                     help="cases whose largest batch is searched (compiled ones recompile per probe)")
    scl = sub.add_parser("scaling", parents=[common], help="ghost vs instantiation, per-layer")
    scl.add_argument("--seqs", nargs="+", type=int, default=None)
    scl.add_argument("--batches", nargs="+", type=int, default=None)
    args = parser.parse_args()
    if not args.child and args.command is None:
        parser.error("choose a command: compare or scaling")
    if not args.child:
        args.preset = args.preset or ("gpu-h100" if args.device == "cuda" else "cpu")
    return args


def base_job(args: argparse.Namespace) -> dict:
    return dict(device=args.device, warmup=args.warmup, steps=args.steps, optimizer=args.optimizer,
                max_grad_norm=args.max_grad_norm, threads=args.threads)


def run_rounds(jobs: dict[str, dict], rounds: int) -> dict[str, list[dict]]:
    """Every job ``rounds`` times, interleaved, so a busy spell hits one round of each."""
    results: dict[str, list[dict]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            results[name].append(spawn(__file__, job))
    return results


def compare(args: argparse.Namespace) -> None:
    preset = PRESETS[args.preset]
    budget = preset["budget_mib"] if args.memory_budget_mib is None else args.memory_budget_mib
    skipped = unavailable(list(args.cases))
    for case, reason in skipped.items():
        print(f"skipping {case}: {reason}")
    cases = [c for c in args.cases if c not in skipped]
    tables, results = [], {}
    for model in args.models:
        shapes = [preset[model]]
        if args.seqs and model in TOKEN_MODELS:
            shapes = [at_sequence_length(preset[model], seq) for seq in args.seqs]
        for shape in shapes:
            job = dict(base_job(args), model=model, shape=shape, batch=shape["batch"],
                       batch_limit=args.batch_limit)
            jobs = {c: dict(job, case=c, budget_mib=budget if c in args.search_cases else 0) for c in cases}
            key = model if len(shapes) == 1 else f"{model}-T{shape['seq']}"
            results[key] = run_rounds(jobs, args.rounds)
            title = (f"{describe(model, shape)}, batch {shape['batch']}, {args.device}, {args.optimizer}, "
                     f"C={args.max_grad_norm}; median of {args.steps} steps after {args.warmup} "
                     f"warm-up, best of {args.rounds} round(s)")
            tables.append(compare_table(title, results[key], budget or None))
            print(tables[-1] + "\n", flush=True)
    write(args.out, "suite", tables, results)
    plot_compare(os.path.join(args.out, "suite.png"), results, time_key(args.device))


def scaling(args: argparse.Namespace) -> None:
    grid = SCALING[args.preset]
    seqs, batches = args.seqs or grid["seqs"], args.batches or grid["batches"]
    shape = PRESETS[args.preset]["gpt"]
    methods = ["non-private", *NORM_METHODS]
    results: dict[tuple[int, int], dict[str, dict]] = {}
    for seq in seqs:
        for batch in batches:
            job = dict(base_job(args), model="gpt", shape=dict(shape, seq=seq), batch=batch, budget_mib=0)
            jobs = {m: dict(job, case="non-private" if m == "non-private" else "ldp-layer",
                            norm_method=m if m != "non-private" else "auto") for m in methods}
            runs = run_rounds(jobs, args.rounds)
            results[(seq, batch)] = {m: min(rs, key=lambda r: r.get("ms", float("inf"))) for m, rs in runs.items()}
            print(f"seq {seq} batch {batch}: " + ", ".join(
                f"{m} {r.get('cpu_ms', float('nan')):.1f} CPU ms" for m, r in results[(seq, batch)].items()),
                flush=True)
    unit = "MiB RSS" if args.device == "cpu" else "MiB alloc"
    title = (f"{describe('gpt', {k: v for k, v in shape.items() if k != 'seq'})}, per-layer clipping, "
             f"{args.device}; median of {args.steps} steps after {args.warmup} warm-up, best of {args.rounds} round(s)")
    table = scaling_table(title, results, methods, unit)
    print("\n" + table)
    write(args.out, "scaling", [table], {f"{s},{b}": r for (s, b), r in results.items()})
    plot_scaling(os.path.join(args.out, "scaling.png"), results, methods, time_key(args.device))


def time_key(device: str) -> str:
    """What the plots show: CPU time on CPU (robust to other processes), wall time on GPUs."""
    return "cpu_ms" if device == "cpu" else "ms"


def write(out: str, name: str, tables: list[str], results: dict) -> None:
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write("\n\n".join(tables) + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)


# ---- child process: one case ------------------------------------------------------------


def run_child(job: dict) -> dict:
    """Time one case at the job's batch, measure its training memory, then search the largest
    batch within the budget."""
    import torch

    device = torch.device(job["device"])
    if device.type == "cpu":
        torch.set_num_threads(job["threads"])
    result = time_case(job, device)
    result["training_mib"], result["memory_kind"] = training_memory(job, device, job["batch"])
    if job.get("budget_mib"):
        result["largest_batch"] = largest_batch(
            lambda b: fits(job, device, b), job["batch"], job["batch_limit"])
    return result


def time_case(job: dict, device) -> dict:
    model, inputs, targets = build(job["model"], job["shape"], job["batch"], device)
    step, _ = build_step(job, model, inputs, targets)
    return time_steps(step, device, job["warmup"], job["steps"])


def training_memory(job: dict, device, batch: int) -> tuple[float, str]:
    """Peak MiB of building the model and two training steps at ``batch``, and what was counted.

    Model, optimizer state, batch, activations, gradients and temporaries; not the interpreter
    and libraries (whose size differs between engines and says nothing about batch capacity).
    Eager CPU cases count tensor bytes (``tensor_bytes.TensorBytes``: exact and repeatable);
    compiled CPU cases, whose kernels a dispatch mode would bypass, count process RSS above
    the start; CUDA counts the caching allocator's allocated bytes.
    """
    def train() -> None:
        model, inputs, targets = build(job["model"], job["shape"], batch, device)
        step, _ = build_step(job, model, inputs, targets)
        step()
        step()

    if device.type == "cpu" and not job["case"].endswith("-compiled"):
        with TensorBytes() as counted:
            train()
        return counted.peak / 2**20, "tensors"
    release_free_memory(device)
    reset_peak(device)
    floor = memory_mib(device, peak=False)
    train()
    return memory_mib(device, peak=True) - floor, "RSS" if device.type == "cpu" else "allocated"


def fits(job: dict, device, batch: int) -> bool:
    """Whether building the model and two training steps at ``batch`` stay within the budget."""
    import torch

    try:
        return training_memory(job, device, batch)[0] <= job["budget_mib"]
    except torch.OutOfMemoryError:
        return False


if __name__ == "__main__":
    sys.exit(main())
