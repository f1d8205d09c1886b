"""The SmolLM2 LoRA recipe, measured: held-out perplexity before fine-tuning, after non-private
LoRA and after DP LoRA (epsilon 8) at the same number of steps; step time and peak memory of DP
LoRA against non-private LoRA.

Each phase runs in a fresh process (so peak RSS is its own): ``pretrained`` (evaluation only),
``non-private`` (Lightning's default strategy, shuffled batches of ``--batch``) and ``dp``
(``DPStrategy``, Poisson batches of expected size ``--batch``, sigma calibrated to epsilon 8 at
delta 1e-5 over ``--steps`` steps). The recipe's model, data, loss and optimizer are used as is;
only sizes are reduced so that it runs on a small CPU.

    python bench/smollm2_lora.py [--steps 20] [--batch 8] [--seq-len 48] [--val-size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def run_phase(phase: str, args: argparse.Namespace) -> dict:
    import lightning as L

    import lightning_dp
    from lightning_dp.recipes import FortunesTextDataModule, LoraCausalLM

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    data = FortunesTextDataModule(seq_len=args.seq_len, batch_size=args.batch, val_size=args.val_size)
    model = LoraCausalLM(lr=args.lr)
    times: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, *_: object) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *_: object) -> None:
            times.append(time.perf_counter() - self.start)

    common = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    result: dict = {"phase": phase}
    if phase == "pretrained":
        trainer = L.Trainer(**common)
    elif phase == "non-private":
        data.train_dataloader = lambda: torch.utils.data.DataLoader(data.train, batch_size=args.batch, shuffle=True)
        trainer = L.Trainer(max_steps=args.steps, callbacks=[StepTimer()], limit_val_batches=0, **common)
        trainer.fit(model, data)
    else:
        accountant = lightning_dp.PrivacyAccountant(target_epsilon=8.0, delta=1e-5, accountant="pld")
        strategy = lightning_dp.DPStrategy(clipping="layer", clip_fn="automatic", max_grad_norm=0.1, seed=0)
        trainer = L.Trainer(max_steps=args.steps, callbacks=[StepTimer(), accountant], strategy=strategy,
                            limit_val_batches=0, **common)
        trainer.fit(model, data)
        card = lightning_dp.privacy_card(trainer)
        result.update(epsilon=card["epsilon"], sigma=card["noise_multiplier"], q=card["sample_rate"],
                      trained=card["trained_parameter_count"], frozen=card["frozen_parameter_count"])
    validation = L.Trainer(**common, limit_val_batches=None)
    result["val_perplexity"] = float(validation.validate(model, data, verbose=False)[0]["val_perplexity"])
    if times:
        result["step_ms"] = 1000 * statistics.median(times[2:] or times)
    with open("/proc/self/status") as status:
        result["peak_rss_mib"] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase, print JSON
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args)), flush=True)
        return
    rows = []
    for phase in ("pretrained", "non-private", "dp"):
        command = [sys.executable, __file__, "--phase", phase] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "phase"
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\nSmolLM2-135M-Instruct + LoRA (r=8, q_proj/v_proj), fortunes, seq {args.seq_len}, batch "
          f"{args.batch}, {args.steps} steps, torch {torch.__version__}, {args.threads} threads\n")
    print("| run | held-out perplexity | ms/step | peak RSS MiB |\n|---|---|---|---|")
    for row in rows:
        step = f"{row['step_ms']:.0f}" if "step_ms" in row else "-"
        print(f"| {row['phase']} | {row['val_perplexity']:.2f} | {step} | {row['peak_rss_mib']:.0f} |")
    dp = rows[-1]
    print(f"\nDP: epsilon {dp['epsilon']:.3f} at delta 1e-5, sigma {dp['sigma']:.3f}, q {dp['q']:.2e}; "
          f"{dp['trained']} trained (LoRA) and {dp['frozen']} frozen parameters. DP / non-private: "
          f"{dp['step_ms'] / rows[1]['step_ms']:.2f}x time, {dp['peak_rss_mib'] / rows[1]['peak_rss_mib']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
