"""Masked vs unmasked Switchable Normalization, forward + backward, on CPU.

A masked call runs the generic fused path with the masked C passes (only the valid positions
are read into statistics; padded outputs and gradients are 0); an unmasked one runs the
whole-layer C operator. The table gives, per shape, the median time of each candidate and
the ratios ``masked / unmasked`` (the issue's target: at most 1.3),
``masked / unmasked generic`` (the unmasked call forced onto the same generic fused path: what
the mask itself costs) and ``masked reference / unmasked`` (what every masked call cost before:
the plain autograd path, ``normkit.use_backend("reference")``).

Every repetition runs all candidates of a shape in a shuffled order; the table gives the
median of each. One thread by default, so that the figures measure the kernels rather than
the thread pool; on a shared machine read the ratios, not the absolute times.

    python benchmarks/bench_masks.py            # 31 repetitions
    python benchmarks/bench_masks.py --quick    # 9 repetitions, under a minute
    python benchmarks/bench_masks.py --icount   # instructions per call (valgrind callgrind), 2-4 minutes

``--icount`` counts instructions instead (as ``bench_icount.py`` does): what other jobs on a
shared machine cannot disturb. Instructions are not time, so read both.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import normkit

# (label, shape, how the mask is drawn)
SHAPES = [
    ("1-D, 30% padding at the end", (8, 64, 256), "tail"),
    ("2-D, 30% random holes", (8, 64, 28, 28), "holes"),
    ("small 1-D, 30% padding", (2, 64, 49), "tail"),
]


def make_mask(shape: tuple, how: str, seed: int = 0) -> torch.Tensor:
    """A bool mask of x's shape without the channel axis with about 30% padded positions."""
    g = torch.Generator().manual_seed(seed)
    n, positions = shape[0], shape[2:]
    if how == "holes":
        return torch.rand(n, *positions, generator=g) >= 0.3
    length = positions[0]
    keep = (length * (0.4 + 0.6 * torch.rand(n, generator=g))).long().clamp_min(1)  # mean 70%
    return torch.arange(length) < keep[:, None]


class _GenericOnly:
    """Route unmasked calls to the generic fused path too (the CPU set without its layer
    operator): separates what the mask costs from what the generic path costs."""

    def __enter__(self):
        from normkit.kernels.ops import CPU_KERNELS

        self.select, plain = normkit.kernels.select, CPU_KERNELS._replace(layer_specs=())
        normkit.kernels.select = lambda x: plain
        return self

    def __exit__(self, *exc):
        normkit.kernels.select = self.select


def _step(layer, x, dy, mask, backend, generic=False):
    def run():
        with normkit.use_backend(backend):
            if generic:
                with _GenericOnly():
                    y = layer(x)
            else:
                y = layer(x, mask) if mask is not None else layer(x)
        y.backward(dy)
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return run


def candidates(shape: tuple, how: str) -> dict:
    torch.manual_seed(0)
    c = shape[1]
    layer = (normkit.SwitchNorm1d if len(shape) == 3 else normkit.SwitchNorm2d)(c)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    mask = make_mask(shape, how)
    return {
        "unmasked": _step(layer, x, dy, None, "auto"),
        "unmasked generic": _step(layer, x, dy, None, "auto", generic=True),
        "masked": _step(layer, x, dy, mask, "auto"),
        "masked reference": _step(layer, x, dy, mask, "reference"),
    }


def measure(shape: tuple, how: str, reps: int, inner: int, seed: int) -> dict[str, float]:
    cands = candidates(shape, how)
    for fn in cands.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cands}
    rng = random.Random(seed)
    order = list(cands)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            fn = cands[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


HELPER = r"""
#include <valgrind/callgrind.h>
void nk_count_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void nk_count_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""
COUNTED = 3


def _icount_child(helper: str) -> None:
    torch.set_num_threads(1)
    lib = ctypes.CDLL(helper)
    for label, shape, how in SHAPES:
        for name, fn in candidates(shape, how).items():
            for _ in range(2):
                fn()
            lib.nk_count_start()
            for _ in range(COUNTED):
                fn()
            lib.nk_count_stop()
            print(f"CASE {'x'.join(map(str, shape))}|{label}|{name}", flush=True)


def icount() -> int:
    if shutil.which("valgrind") is None:
        print("--icount needs valgrind", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nk-masks-") as tmp:
        helper, src, out = (os.path.join(tmp, f) for f in ("libcount.so", "count.c", "cg.out"))
        with open(src, "w") as f:
            f.write(HELPER)
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", src, "-o", helper], check=True)
        done = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                               sys.executable, os.path.abspath(__file__), "--child", helper],
                              capture_output=True, text=True)
        names = [line[5:] for line in done.stdout.splitlines() if line.startswith("CASE ")]
        counts = []
        for path in sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1])):
            with open(path) as f:
                counts += [int(line.split()[1]) for line in f if line.startswith("totals:")]
        if done.returncode != 0 or len(counts) != len(names):
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
    table: dict[tuple, dict] = {}
    for name, count in zip(names, counts):
        shape, label, cand = name.split("|")
        table.setdefault((shape, label), {})[cand] = count / COUNTED
    print("1 thread; millions of instructions per forward+backward (callgrind)\n")
    print("| shape | mask | unmasked | unmasked generic | masked | masked ref | masked / unmasked "
          "| masked / unmasked generic | masked ref / unmasked |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (shape, label), t in table.items():
        u, g, m, r = t["unmasked"], t["unmasked generic"], t["masked"], t["masked reference"]
        print(f"| {shape} | {label} | {u / 1e6:.2f} | {g / 1e6:.2f} | {m / 1e6:.2f} | {r / 1e6:.2f} | {m / u:.2f} "
              f"| {m / g:.2f} | {r / u:.2f} |")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="9 repetitions (under a minute)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--icount", action="store_true", help="count instructions with valgrind callgrind")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _icount_child(args.child)
        return
    if args.icount:
        sys.exit(icount())
    reps = args.reps or (9 if args.quick else 31)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {reps} shuffled repetitions, medians, "
          f"kernels: {normkit.kernels.status()['cpu']['kernels']}\n")
    print("| shape | mask | unmasked us | unmasked generic us | masked us | masked ref us | masked / unmasked "
          "| masked / unmasked generic | masked ref / unmasked |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, shape, how in SHAPES:
        inner = 20 if shape[0] * shape[1] * shape[2] < 20000 else 3
        t = measure(shape, how, reps, inner, args.seed)
        u, g, m, r = t["unmasked"], t["unmasked generic"], t["masked"], t["masked reference"]
        print(f"| {'x'.join(map(str, shape))} | {label} | {u * 1e6:.0f} | {g * 1e6:.0f} | {m * 1e6:.0f} | "
              f"{r * 1e6:.0f} | {m / u:.2f} | {m / g:.2f} | {r / u:.2f} |", flush=True)


if __name__ == "__main__":
    main()
