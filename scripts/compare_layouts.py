#!/usr/bin/env python
"""NCHW (PyTorch's default) against NHWC (channels_last) weights for every built-in backbone on
this machine's CPU: seconds per forward pass (inference) and per forward + backward (training),
batches of 16 at 224 px, best of two runs of the median step. What `Runtime.prepare` and each
backbone's `cpu_channels_last` are based on.

    python scripts/compare_layouts.py [--size 224] [--batch 16] [backbone ...]

Run nothing else meanwhile: it times both layouts."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mdn_cli.backbones import REGISTRY


def seconds(net: torch.nn.Module, size: int, batch: int, nhwc: bool, train: bool, steps: int = 6) -> float:
    net = net.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format).train(train)
    x = torch.randn(batch, 3, size, size)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        if train:
            net(x).square().mean().backward()
        else:
            with torch.inference_mode():
                net(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="*", default=sorted(REGISTRY))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, {args.batch} images of {args.size} px; NHWC / NCHW time (below 1: NHWC faster)\n")
    print("| backbone | inference NCHW s | NHWC s | ratio | training NCHW s | NHWC s | ratio | NHWC on CPUs in mdn |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.backbones:
        net, _ = REGISTRY[name].build(False)
        cells = []
        for train in (False, True):
            nchw = min(seconds(net, args.size, args.batch, False, train) for _ in range(2))
            nhwc = min(seconds(net, args.size, args.batch, True, train) for _ in range(2))
            cells += [f"{nchw:.3f}", f"{nhwc:.3f}", f"{nhwc / nchw:.2f}"]
        print(f"| {name} | {' | '.join(cells)} | {'yes' if REGISTRY[name].cpu_channels_last else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
