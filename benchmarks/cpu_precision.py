"""The CPU training step at the `cpu` profile's width: fp32 vs bf16 autocast, eager vs compiled.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_precision.py --threads 2
    python benchmarks/cpu_precision.py --threads 1 --compile      # adds torch.compile (minutes)

What it answers: is `amp="auto"`'s rule (bf16 only on a CPU with native bf16) right on this
CPU, is channels_last worth it, and what `--set compile=true` buys a long CPU run.  One
process, the variants one after another on the same batch (model forward + backward and a
Nesterov SGD step; no data pipeline, no EMA), so only ratios within one run compare.
"""
from __future__ import annotations

import argparse
import time

import torch

from samlib.device import cpu_has_native_bf16
from samlib.model import build_model


def images_per_second(bf16: bool, channels_last: bool, compiled: bool, steps: int, batch: int = 128):
    """(images/s over `steps` timed steps, seconds of the 3 untimed warm-up steps)."""
    torch.manual_seed(0)
    model = build_model(se=True, widths=(16, 32, 64))
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0), warmup


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (fp32, channels_last)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), native bf16: {cpu_has_native_bf16()}")
    variants = [("fp32", False, False, False), ("fp32 channels_last", False, True, False),
                ("bf16 autocast", True, False, False), ("bf16 autocast channels_last", True, True, False)]
    if args.compile:
        variants.append(("fp32 channels_last compiled", False, True, True))
    base = None
    for name, bf16, cl, compiled in variants:
        rate, warmup = images_per_second(bf16, cl, compiled, args.steps)
        base = base or rate
        print(f"{name:<30}{rate:>8.1f} images/s  {rate / base:>5.2f}x fp32   (warm-up {warmup:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
