"""Time one training step of a small GPT: non-private vs lightning-dp vs Opacus, side by side.

One step is: zero grads, forward, per-example-summed cross-entropy (each sequence's token
losses summed, then summed over the batch), backward, optimizer step. Every private case clips
per-example gradients to ``--max-grad-norm`` and adds no noise, so all of them compute
``sum_i clip(g_i)`` on the same weights and batch:

  non-private    plain model, same loss
  ldp-layer      lightning_dp.make_private(clipping="layer"): one threshold per layer, fused in backward
  ldp-flat       lightning_dp.make_private(clipping="flat"): one threshold for the whole model
  opacus-hooks   Opacus PrivacyEngine, grad_sample_mode="hooks" (per-example grads, flat clip)
  opacus-ghost   Opacus PrivacyEngine, grad_sample_mode="ghost" (ghost norms, two backwards)

Each case runs in its own fresh process (bench/harness.py; so allocator state and peak memory of
one case cannot leak into another) and reports the median over ``--steps`` timed steps after
``--warmup``. The
cases run interleaved for ``--rounds`` rounds and the table keeps each case's best round: on a
shared machine other processes only ever add time. Every round's median is printed with its CPU
stall, the share of wall time during the steps in which some runnable task waited for a core
(Linux PSI ``/proc/pressure/cpu``): near 0% means nothing competed with the benchmark.

Memory: on CPU, "base" is the process RSS just before the first step (model, optimizer, data,
DP wrappers) and "peak" the process's maximum RSS over the steps (``VmHWM``), so
"peak - base" is what training steps add: activations, saved factors, per-example gradients,
gradients and optimizer state. On CUDA both come from ``torch.cuda`` allocator statistics
(allocated tensors only, excluding the cache). "grad norm, step 1" is the global norm of
``.grad`` after the first step: the three flat-clipping cases must agree, which checks that the
comparison is fair.

    python bench/step_time.py [--device cpu|cuda] [--preset cpu|gpu-gpt2]

``bench/suite.py`` runs the wider comparison (three models, compiled cases, largest batch).
"""

from __future__ import annotations

import argparse
import json
import sys

from cases import build_step, unavailable
from harness import best_round, environment, spawn, time_steps

CASES = ("non-private", "ldp-layer", "ldp-flat", "opacus-hooks", "opacus-ghost")

PRESETS = {
    "cpu": [
        dict(vocab=2000, d=128, layers=4, heads=4, seq=128, batch=16),
        dict(vocab=2000, d=128, layers=4, heads=4, seq=512, batch=4),  # longer sequence
    ],
    "gpu-gpt2": [dict(vocab=50257, d=768, layers=12, heads=12, seq=256, batch=16)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="model/batch shapes; default: cpu on cpu, gpu-gpt2 on cuda")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3,
                        help="fresh processes per case; the table reports the best round")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))), flush=True)
        return

    preset = args.preset or ("gpu-gpt2" if args.device == "cuda" else "cpu")
    skipped = unavailable(list(args.cases))
    for case, reason in skipped.items():
        print(f"skipping {case}: {reason}")
    cases = [c for c in args.cases if c not in skipped]
    print(environment(args.device, args.threads))
    for shape in PRESETS[preset]:
        job = dict(shape, device=args.device, warmup=args.warmup, steps=args.steps,
                   optimizer=args.optimizer, max_grad_norm=args.max_grad_norm, threads=args.threads,
                   rounds=args.rounds)
        rounds: dict[str, list[dict]] = {case: [] for case in cases}
        for _ in range(args.rounds):  # cases interleaved, so a busy spell hits one round of each
            for case in cases:
                rounds[case].append(spawn(__file__, dict(job, case=case)))
        print_table(job, rounds)


def print_table(job: dict, rounds: dict[str, list[dict]]) -> None:
    best = {case: best_round(rs) for case, rs in rounds.items()}
    params = best.get("non-private", {}).get("params")
    print(f"\nGPT d={job['d']} layers={job['layers']} heads={job['heads']} vocab={job['vocab']} "
          f"seq={job['seq']} batch={job['batch']}"
          + (f" ({params / 1e6:.2f}M params)" if params else "")
          + f", {job['device']}, {job['optimizer']}, C={job['max_grad_norm']}; median of "
          f"{job['steps']} steps after {job['warmup']} warm-up, best of {job['rounds']} rounds\n")
    unit = "MiB RSS" if job["device"] == "cpu" else "MiB alloc"
    print(f"| case | ms/step | vs non-private | peak {unit} | peak - base {unit} "
          "| grad norm, step 1 | every round: median ms (CPU stall) |")
    print("|---|---|---|---|---|---|---|")
    ref = best.get("non-private", {}).get("ms")
    for case, r in best.items():
        if "error" in r:
            print(f"| {case} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['ms'] / ref:.2f}x" if ref else "n/a"
        spread = ", ".join(f"{x['ms']:.0f} ({x['stall']:.0f}%)" if "error" not in x else "failed"
                           for x in rounds[case])
        print(f"| {case} | {r['ms']:.1f} | {ratio} | {r['peak']:.0f} | {r['peak'] - r['base']:.0f} "
              f"| {r['grad_norm']:.4g} | {spread} |")
    sys.stdout.flush()


# ---- child process: one case ------------------------------------------------------------


def run_case(job: dict) -> dict:
    import torch
    from workloads import build

    device = torch.device(job["device"])
    if device.type == "cpu":
        torch.set_num_threads(job["threads"])
    model, ids, targets = build("gpt", job, job["batch"], device)
    step, _ = build_step(job, model, ids, targets)
    grad_norm = []

    def record_grad_norm() -> None:
        grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
        grad_norm.append(torch.cat(grads).norm().item())

    result = time_steps(step, device, job["warmup"], job["steps"], after_first=record_grad_norm)
    return dict(result, grad_norm=grad_norm[0], params=sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
