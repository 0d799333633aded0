"""Per-call cost of normkit's layers on small inputs, as ratios to torch.nn measured in the same
process: run it on two checkouts to compare them (A/B).

    python benchmarks/bench_small_ab.py                       # this checkout, 1 and 2 threads
    python benchmarks/bench_small_ab.py --root /path/to/other # another normkit source tree
    python benchmarks/bench_small_ab.py --quick               # 3 repetitions, under a minute

For each shape and thread count, every variant runs training forward+backward, training
forward (autograd on) and no-grad eval forward; the variants are torch.nn's BatchNorm2d and
GroupNorm(8) and normkit's SwitchNorm2d, BatchNorm2d and GroupNorm(8). Repetitions run the
cases in a fresh shuffled order each time; each case reports the median. Ratios: normkit SN and
BN to nn.BatchNorm2d, normkit GN to nn.GroupNorm, and SN to nn.GroupNorm (the bar that moves
the same bytes). Prints a markdown table, and the raw medians with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

SHAPES = [(2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7), (8, 32, 14, 14), (32, 64, 7, 7), (1, 256, 14, 14)]
MODES = ("fwd+bwd", "fwd", "eval")
VARIANTS = ("nn.BN", "nn.GN", "SN", "BN", "GN")
RATIOS = (("SN", "nn.BN"), ("BN", "nn.BN"), ("GN", "nn.GN"), ("SN", "nn.GN"))


def _time(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def _cases(torch, normkit, shape):
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    layers = {"nn.BN": torch.nn.BatchNorm2d(c), "nn.GN": torch.nn.GroupNorm(8, c), "SN": normkit.SwitchNorm2d(c),
              "BN": normkit.BatchNorm2d(c), "GN": normkit.GroupNorm(8, c)}
    cases = {}
    for name, layer in layers.items():
        cases[(name, "fwd+bwd")] = (layer, True, (lambda m: lambda: m(x).sum().backward())(layer))
        cases[(name, "fwd")] = (layer, True, (lambda m: lambda: m(x))(layer))
        cases[(name, "eval")] = (layer, False, (lambda m: lambda: m(x))(layer))
    return cases


def measure(torch, normkit, shape, threads: int, reps: int, number: int) -> dict:
    """Median microseconds per call of every (variant, mode) on one shape."""
    torch.set_num_threads(threads)
    cases = _cases(torch, normkit, shape)
    samples: dict = {key: [] for key in cases}
    for module, training, fn in cases.values():  # warm-up: first-call costs out of the samples
        module.train(training)
        with torch.set_grad_enabled(training):
            _time(fn, 3)
    keys = list(cases)
    for _ in range(reps):
        random.shuffle(keys)
        for key in keys:
            module, training, fn = cases[key]
            module.train(training)
            with torch.set_grad_enabled(training):
                samples[key].append(_time(fn, number))
    return {f"{name} {mode}": statistics.median(v) for (name, mode), v in samples.items()}


def table(results: dict) -> str:
    """Markdown: per shape and thread count, nn.BN's time and the ratios, for each mode."""
    head = "| threads | N,C,H,W | mode | nn.BN us | nn.GN / nn.BN | " + " | ".join(
        f"{a} / {b}" for a, b in RATIOS) + " |"
    lines = [head, "|" + "---|" * (5 + len(RATIOS))]
    for key, row in results.items():
        threads, shape = key.split(" ", 1)
        for mode in MODES:
            bn = row[f"nn.BN {mode}"]
            cells = [f"{row[f'{a} {mode}'] / row[f'{b} {mode}']:.2f}" for a, b in RATIOS]
            lines.append(f"| {threads} | {shape} | {mode} | {bn:.0f} | {row[f'nn.GN {mode}'] / bn:.2f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="a normkit source tree to import instead of this checkout")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=9, help="shuffled repetitions per case")
    parser.add_argument("--number", type=int, default=200, help="calls per repetition")
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 50 calls (under a minute)")
    parser.add_argument("--shapes", nargs="+", help="N,C,H,W shapes instead of the six small ones")
    parser.add_argument("--json", help="also write the raw medians (us) here")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root) if args.root else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    import torch

    import normkit

    if args.quick:
        args.reps, args.number = 3, 50
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    results = {}
    for threads in args.threads:
        for shape in shapes:
            results[f"{threads} {','.join(map(str, shape))}"] = measure(torch, normkit, shape, threads, args.reps,
                                                                        args.number)
    print(f"normkit from {os.path.dirname(normkit.__file__)}; torch {torch.__version__}; median of {args.reps} "
          f"shuffled repetitions x {args.number} calls; ratios from the same run")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"normkit": normkit.__file__, "reps": args.reps, "number": args.number, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
