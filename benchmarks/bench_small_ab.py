"""Per-call cost of normkit's layers on small inputs, as ratios to nn.BatchNorm2d measured in
the same process: run it on two checkouts to compare them (A/B).

    python benchmarks/bench_small_ab.py                 # this checkout
    python benchmarks/bench_small_ab.py /path/to/other  # another normkit source tree

1 thread, 9 shuffled repetitions of 400 calls each, medians; prints one JSON object
``{shape: {case: microseconds}}`` with training forward+backward and no-grad eval forward of
nn.BatchNorm2d, normkit SwitchNorm2d, BatchNorm2d and GroupNorm(8).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time

SHAPES = [(2, 64, 7, 7), (2, 16, 28, 28), (8, 32, 14, 14)]


def _time(fn, number: int = 400) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def main() -> int:
    root = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(__file__))
    sys.path.insert(0, root)
    import torch

    import normkit

    torch.set_num_threads(1)
    out = {}
    for shape in SHAPES:
        c = shape[1]
        x = torch.randn(shape, requires_grad=True)
        mods = {"nn.BN": torch.nn.BatchNorm2d(c), "SN": normkit.SwitchNorm2d(c), "BN": normkit.BatchNorm2d(c),
                "GN": normkit.GroupNorm(8, c)}
        cases = {}
        for name, m in mods.items():
            cases[f"{name} fwd+bwd"] = (m, True, (lambda m: lambda: m(x).sum().backward())(m))
            cases[f"{name} eval fwd"] = (m, False, (lambda m: lambda: m(x))(m))
        samples: dict = {k: [] for k in cases}
        for _ in range(9):
            keys = list(cases)
            random.shuffle(keys)
            for key in keys:
                module, training, fn = cases[key]
                module.train(training)
                with torch.set_grad_enabled(training):
                    fn()
                    samples[key].append(_time(fn))
        out[str(shape)] = {k: statistics.median(v) for k, v in samples.items()}
    print(json.dumps({"normkit": normkit.__file__, "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
