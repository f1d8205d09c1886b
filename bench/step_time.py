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

Each case runs in its own fresh process (so allocator state and peak memory of one case cannot
leak into another) and reports the median over ``--steps`` timed steps after ``--warmup``. The
cases run interleaved for ``--rounds`` rounds and the table keeps each case's best round: on a
shared machine other processes only ever add time. Every round's median is printed with its CPU
stall, the share of wall time during the steps in which some runnable task waited for a core
(Linux PSI ``/proc/pressure/cpu``): near 0% means nothing competed with the benchmark.

Memory: on CPU, "base" is the process RSS just before the first step (model, optimizer, data,
DP wrappers) and "peak" the process's maximum RSS (``getrusage``) after all steps, so
"peak - base" is what training steps add: activations, saved factors, per-example gradients,
gradients and optimizer state. On CUDA both come from ``torch.cuda`` allocator statistics
(allocated tensors only, excluding the cache). "grad norm, step 1" is the global norm of
``.grad`` after the first step: the three flat-clipping cases must agree, which checks that the
comparison is fair.

    python bench/step_time.py [--device cpu|cuda] [--preset cpu|gpu-gpt2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

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
    cases = list(args.cases)
    if importlib.util.find_spec("opacus") is None and any(c.startswith("opacus") for c in cases):
        print("opacus is not installed: skipping the opacus-* cases (pip install opacus to run "
              "them; it is not a lightning-dp dependency).\n")
        cases = [c for c in cases if not c.startswith("opacus")]
    print(environment(args.device, args.threads))
    for shape in PRESETS[preset]:
        job = dict(shape, device=args.device, warmup=args.warmup, steps=args.steps,
                   optimizer=args.optimizer, max_grad_norm=args.max_grad_norm, threads=args.threads,
                   rounds=args.rounds)
        rounds: dict[str, list[dict]] = {case: [] for case in cases}
        for _ in range(args.rounds):  # cases interleaved, so a busy spell hits one round of each
            for case in cases:
                rounds[case].append(spawn(dict(job, case=case)))
        print_table(job, rounds)


def spawn(job: dict) -> dict:
    """Run one case in a fresh interpreter; return its JSON result or the error it died with."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def environment(device: str, threads: int) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    parts = [f"torch {torch.__version__}", f"CPU: {cpu} ({os.cpu_count()} cores)"]
    if device == "cpu":
        parts.append(f"{threads} torch threads")
    else:
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    if importlib.util.find_spec("opacus") is not None:
        import opacus

        parts.append(f"opacus {opacus.__version__}")
    return ", ".join(parts)


def print_table(job: dict, rounds: dict[str, list[dict]]) -> None:
    best = {case: min((r for r in rs if "error" not in r), key=lambda r: r["ms"], default=rs[-1])
            for case, rs in rounds.items()}
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

    from models import GPT, GPTConfig

    device = torch.device(job["device"])
    if device.type == "cpu":
        torch.set_num_threads(job["threads"])
    cfg = GPTConfig(job["vocab"], job["d"], job["layers"], job["heads"], job["seq"])
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    data = torch.randint(cfg.vocab, (job["batch"], cfg.seq + 1),
                         generator=torch.Generator().manual_seed(1)).to(device)
    ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    opt_cls = torch.optim.Adam if job["optimizer"] == "adam" else torch.optim.SGD
    optimizer = opt_cls(model.parameters(), lr=1e-4)
    step = build_step(job, model, optimizer, ids, targets)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = memory_mib(device, peak=False)
    times, grad_norm = [], None
    stall_start, wall_start = cpu_stall_s(), time.perf_counter()
    for i in range(job["warmup"] + job["steps"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        if i == 0:
            grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
            grad_norm = torch.cat(grads).norm().item()
    timed = times[job["warmup"]:]
    stalled = cpu_stall_s() - stall_start
    return dict(ms=statistics.median(timed), grad_norm=grad_norm,
                stall=100 * stalled / (time.perf_counter() - wall_start),
                base=base, peak=memory_mib(device, peak=True),
                params=sum(p.numel() for p in model.parameters()))


def build_step(job: dict, model, optimizer, ids, targets):
    """The closure for one training step of ``job['case']`` (setting up the DP engine first)."""
    import torch

    from models import per_example_loss

    case, clip = job["case"], job["max_grad_norm"]
    if case.startswith("ldp-"):
        import lightning_dp

        lightning_dp.make_private(model, clipping=case.removeprefix("ldp-"), max_grad_norm=clip)
    elif case.startswith("opacus-"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(ids, targets), batch_size=ids.shape[0])  # unused
        common = dict(optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
                      max_grad_norm=clip, loss_reduction="sum", poisson_sampling=False)
        if case == "opacus-ghost":
            # Ghost clipping runs two backwards: the wrapped criterion's loss.backward() does the
            # norm pass, then re-weights the per-example losses by the clip factors and
            # backpropagates again. Its loss must have reduction "sum" to match loss_reduction.
            criterion = torch.nn.CrossEntropyLoss(reduction="sum")
            gsm, dp_opt, dp_loss, _ = PrivacyEngine().make_private(
                module=model, criterion=criterion, grad_sample_mode="ghost", **common)

            def ghost_step() -> None:
                dp_opt.zero_grad(set_to_none=True)
                logits = gsm(ids)
                # shape=[B, T, V] makes the wrapper sum token losses per sequence: loss_i as above
                dp_loss(logits.flatten(0, 1), targets.flatten(), shape=logits.shape).backward()
                dp_opt.step()

            return ghost_step
        model, optimizer, _ = PrivacyEngine().make_private(
            module=model, grad_sample_mode="hooks", **common)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        per_example_loss(model(ids), targets).sum().backward()
        optimizer.step()

    return step


def cpu_stall_s() -> float:
    """Seconds (cumulative) during which some runnable task waited for a CPU (Linux PSI)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return float("nan")


def memory_mib(device, peak: bool) -> float:
    import torch

    if device.type == "cuda":
        stat = torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
        return stat / 2**20
    if peak:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


if __name__ == "__main__":
    main()
