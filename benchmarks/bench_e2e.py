"""End to end: a training step of the study's CNN (``experiments.batch_size.ResNetSmall``, 10
normalization layers, Fashion-MNIST-sized input) with each normalizer, as time ratios to the
same step with ``torch.nn.BatchNorm2d`` measured in one run.

A step is forward, cross-entropy, backward and an SGD update (momentum 0.9), in training mode.
Variants: ``nn.BatchNorm2d`` and ``nn.GroupNorm(8)`` (the normkit model converted with
``normkit.convert(model, "torch")``), normkit ``bn``, ``gn`` and ``sn``. Every repetition runs
all variants of a batch size in a shuffled order; the table gives medians and ratios of
medians. One thread by default (the study's default).

    python benchmarks/bench_e2e.py            # batch 2, 8, 32; 15 repetitions of 10 steps
    python benchmarks/bench_e2e.py --quick    # 5 repetitions of 5 steps
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normkit  # noqa: E402
from experiments.batch_size import ResNetSmall  # noqa: E402

VARIANTS = ("nn.BatchNorm2d", "normkit bn", "normkit sn", "nn.GroupNorm(8)", "normkit gn")


def _model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant.startswith("nn."):
        return normkit.convert(ResNetSmall("bn" if "Batch" in variant else "gn"), "torch")
    return ResNetSmall(variant.split()[1])


def _stepper(variant: str, batch: int):
    model = _model(variant).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, target = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repetitions of 5 steps")
    parser.add_argument("--batches", default="2,8,32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps, inner = (5, 5) if args.quick else (15, 10)
    print(f"ResNetSmall training step (SGD), {args.threads} thread(s), median of {reps} shuffled repetitions "
          f"of {inner} steps; ratio to nn.BatchNorm2d")
    print("| batch | " + " | ".join(VARIANTS) + " |")
    print("|---:|" + "---:|" * len(VARIANTS))
    order = random.Random(0)
    for batch in (int(b) for b in args.batches.split(",")):
        steps = {v: _stepper(v, batch) for v in VARIANTS}
        for step in steps.values():
            for _ in range(3):
                step()
        times = {v: [] for v in VARIANTS}
        for _ in range(reps):
            names = list(VARIANTS)
            order.shuffle(names)
            for v in names:
                start = time.perf_counter()
                for _ in range(inner):
                    steps[v]()
                times[v].append((time.perf_counter() - start) / inner * 1e3)
        med = {v: statistics.median(t) for v, t in times.items()}
        base = med["nn.BatchNorm2d"]
        cells = [f"{med[v]:.2f} ms" if v == "nn.BatchNorm2d" else f"{med[v] / base:.2f}" for v in VARIANTS]
        print(f"| {batch} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
