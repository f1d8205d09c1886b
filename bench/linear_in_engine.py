"""One private linear layer's forward and backward through ``make_private``, ghost against
instantiation, with the cache cold: what the norm-method rule should pick inside a real step.

    python bench/linear_in_engine.py                 # the GPT preset's LM head, 2000 x 128
    python bench/linear_in_engine.py --p 512         # its MLP's first layer
    python bench/linear_in_engine.py --device cuda   # (not yet run on a GPU)

``bench/norm_methods.py`` times the clipping alone in a tight loop, where the instantiated
gradients of one call are still in cache for the next. In a training step the layers in between
evict them, and the first layer of a backward (an untied LM head) has no freed memory to use,
so its instantiation runs in chunks. Here each timed step is preceded by a pass over a buffer
larger than the last-level cache, and the layer is the model's only one (nothing freed before it):
the cost of a chunked instantiation, as the ``CHUNKED_GHOST_WORK_PER_ELEMENT`` constant models.
Tokens per batch are the GPT preset's (1024), so the batch shrinks as the sequence grows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import environment, synchronizer

import lightning_dp
from lightning_dp.rules.norm_method import choose_norm_method, write_through_caches
from lightning_dp.rules.protocol import examples_per_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=int, default=2000, help="output features")
    parser.add_argument("--d", type=int, default=128, help="input features")
    parser.add_argument("--seqs", nargs="+", type=int, default=[32, 64, 128, 256])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per batch")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (unmeasured so far)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(environment(device.type, args.threads) + "\n")
    print("| batch | T | p x d | T^2 (1/p + 1/d) | chunked | non-private ms | ghost | instantiate | rule picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    evict = None  # the buffer norm_method="measure" writes through the caches before each run
    sync = synchronizer(device)
    p, d = args.p, args.d
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        x = torch.randn(batch, seq, d, device=device, requires_grad=True)
        g = torch.randn(batch, seq, p, device=device)
        layers = {"non-private": _layer(p, d, None, device), "ghost": _layer(p, d, "ghost", device),
                  "instantiate": _layer(p, d, "instantiate", device)}
        times: dict[str, list[float]] = {name: [] for name in layers}
        for round_ in range(args.rounds + 3):
            for name, layer in layers.items():  # alternating: a busy spell slows all three
                evict = write_through_caches(device, evict)
                layer.zero_grad(set_to_none=True)
                sync()
                start = time.perf_counter()
                layer(x).backward(g)
                sync()
                if round_ >= 3:
                    times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        chunked = examples_per_chunk(batch, p * d, seq * (p + d)) < batch
        picked = choose_norm_method(batch, seq, p, d, "auto", device.type, spare=0)  # nothing freed
        extra = {m: f"+{ms[m] - ms['non-private']:.2f} ms" for m in ("ghost", "instantiate")}
        print(f"| {batch} | {seq} | {p}x{d} | {seq * seq * (1 / p + 1 / d):.0f} | {chunked} | "
              f"{ms['non-private']:.2f} | {extra['ghost']} | {extra['instantiate']} | {picked} |")


def _layer(p: int, d: int, method: str | None, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.Linear(d, p, bias=False, device=device)
    if method is not None:
        lightning_dp.make_private(layer, clipping="layer", max_grad_norm=1.0, norm_method=method)
    return layer


if __name__ == "__main__":
    main()
