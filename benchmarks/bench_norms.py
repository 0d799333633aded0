"""Speed and memory of normkit's normalization layers against torch.nn on the CPU.

For each shape and memory format, times (median wall clock, training mode, autograd on):

* ``normkit SN``: :class:`normkit.SwitchNorm2d` (IN+LN+BN), default backend;
* ``normkit BN``: :class:`normkit.BatchNorm2d`;
* ``nn.BatchNorm2d`` (the reference for every ratio) and ``nn.GroupNorm(32)``;
* ``naive SN``: an eager SN written below with three separate statistics passes;
* ``SN compiled``: ``torch.compile(normkit.SwitchNorm2d)`` (Inductor traces the reference path),

forward and forward+backward, with ratios to ``nn.BatchNorm2d``, effective bandwidth
(``2 * bytes(x)`` forward, ``5 * bytes(x)`` forward+backward: x in, y out; x and dy in,
dx out) next to a same-size copy timed in the same run, and the peak memory of one
training step (see :func:`peak_step_bytes`). Variants are timed round-robin in a fresh
(seeded) order every repetition, so load changes on the machine and allocator effects of
the previous variant hit all of them alike.

Usage::

    python benchmarks/bench_norms.py                 # full table (a few minutes, compile incl.)
    python benchmarks/bench_norms.py --quick         # fewer repetitions, no torch.compile
    python benchmarks/bench_norms.py --json out.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normkit  # noqa: E402

SHAPES = [(32, 64, 32, 32), (8, 256, 14, 14), (2, 64, 56, 56), (128, 128, 8, 8), (4, 512, 7, 7)]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
REFERENCE = "nn.BatchNorm2d"


class NaiveSwitchNorm2d(nn.Module):
    """Eager Switchable Normalization as usually written: IN, LN and BN statistics each
    computed from x by its own reduction, mixed with softmax weights (biased variances)."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_logits = nn.Parameter(torch.zeros(3))
        self.var_logits = nn.Parameter(torch.zeros(3))
        self.register_buffer("running_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("running_var", torch.ones(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        var_in, mean_in = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        var_ln, mean_ln = torch.var_mean(x, dim=(1, 2, 3), keepdim=True, correction=0)
        var_bn, mean_bn = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
        with torch.no_grad():
            count = x.numel() / x.shape[1]
            self.running_mean.lerp_(mean_bn, self.momentum)
            self.running_var.lerp_(var_bn * count / (count - 1), self.momentum)
        wm, wv = torch.softmax(self.mean_logits, 0), torch.softmax(self.var_logits, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        return (x - mean) / (var + self.eps).sqrt() * self.weight + self.bias


def make_variants(channels: int, compile_sn: bool) -> dict[str, nn.Module]:
    variants: dict[str, nn.Module] = {
        "normkit SN": normkit.SwitchNorm2d(channels),
        "normkit BN": normkit.BatchNorm2d(channels),
        REFERENCE: nn.BatchNorm2d(channels),
        "nn.GroupNorm(32)": nn.GroupNorm(32, channels),
        "naive SN": NaiveSwitchNorm2d(channels),
    }
    if compile_sn:
        variants["SN compiled"] = torch.compile(normkit.SwitchNorm2d(channels))
    return variants


def peak_step_bytes(step: Callable[[], None]) -> int:
    """Peak bytes live in PyTorch's CPU allocator during ``step()`` beyond what was live
    before: the autograd profiler's per-op allocation records (``self_cpu_memory_usage``,
    net bytes allocated by each op itself), accumulated in op start order. x, dy and the
    parameters exist before the step and are not counted; the output, the saved tensors,
    dx and every temporary are. The C kernels' private O(N*C) malloc workspace is not seen."""
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        step()
    events = sorted(prof.function_events, key=lambda e: (e.time_range.start, -e.time_range.end))
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def run_shape(shape, fmt_name: str, reps: int, compile_sn: bool, memory: bool) -> list[dict]:
    fmt = FORMATS[fmt_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    variants = make_variants(shape[1], compile_sn)
    scratch = torch.empty_like(x, requires_grad=False)
    xd = x.detach()

    def fwd(module):
        return lambda: module(x)

    def fwd_bwd(module):
        def step():
            x.grad = None
            module(x).backward(dy)
        return step

    work = {("copy", "copy"): lambda: scratch.copy_(xd)}
    for name, module in variants.items():
        work[(name, "fwd")] = fwd(module)
        work[(name, "fwd+bwd")] = fwd_bwd(module)
    for fn in work.values():  # warm-up (compiles SN compiled, builds the C kernels)
        for _ in range(2):
            fn()
    times: dict = {key: [] for key in work}
    # A fresh order every repetition: the variant timed right after a large free (naive SN
    # releases ~20 temporaries) pays for glibc returning memory to the OS and faulting it
    # back in; a fixed order would always charge that to the same variant (~0.2-0.4 ms).
    order = list(work.items())
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for key, fn in order:
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    nbytes = x.numel() * x.element_size()
    copy_gbs = 2 * nbytes / med[("copy", "copy")] / 1e9
    rows = []
    for name, module in variants.items():
        row = {
            "shape": list(shape),
            "format": fmt_name,
            "variant": name,
            "fwd_us": med[(name, "fwd")] * 1e6,
            "fwd_bwd_us": med[(name, "fwd+bwd")] * 1e6,
            "fwd_ratio_bn": med[(name, "fwd")] / med[(REFERENCE, "fwd")],
            "fwd_bwd_ratio_bn": med[(name, "fwd+bwd")] / med[(REFERENCE, "fwd+bwd")],
            "fwd_gbs": 2 * nbytes / med[(name, "fwd")] / 1e9,
            "fwd_bwd_gbs": 5 * nbytes / med[(name, "fwd+bwd")] / 1e9,
            "copy_gbs": copy_gbs,
            "bytes_x": nbytes,
        }
        if memory:
            x.grad = None
            peak = peak_step_bytes(fwd_bwd(module))
            row["peak_step_bytes"] = peak
            row["peak_step_over_x"] = peak / nbytes
        rows.append(row)
    x.grad = None
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | format | variant | fwd us | fwd / BN | fwd+bwd us | fwd+bwd / BN | fwd+bwd GB/s (copy) | peak step / bytes(x) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = f"{r['peak_step_over_x']:.2f}" if "peak_step_over_x" in r else "-"
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['format']} | {r['variant']} | {r['fwd_us']:.0f} | "
            f"{r['fwd_ratio_bn']:.2f} | {r['fwd_bwd_us']:.0f} | {r['fwd_bwd_ratio_bn']:.2f} | "
            f"{r['fwd_bwd_gbs']:.1f} ({r['copy_gbs']:.0f}) | {peak} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The issue's targets, checked against this run."""
    def pick(variant, fmt):
        return [r for r in rows if r["variant"] == variant and r["format"] == fmt]

    out = []
    for fmt in FORMATS:
        sn = pick("normkit SN", fmt)
        if not sn:
            continue
        naive = {tuple(r["shape"]): r for r in pick("naive SN", fmt)}
        bn = pick("normkit BN", fmt)
        out.append(
            f"- {fmt}: normkit SN / nn.BatchNorm2d: fwd {min(r['fwd_ratio_bn'] for r in sn):.2f}-"
            f"{max(r['fwd_ratio_bn'] for r in sn):.2f}, fwd+bwd {min(r['fwd_bwd_ratio_bn'] for r in sn):.2f}-"
            f"{max(r['fwd_bwd_ratio_bn'] for r in sn):.2f}; speed-up over naive SN (fwd+bwd) "
            f"{min(naive[tuple(r['shape'])]['fwd_bwd_us'] / r['fwd_bwd_us'] for r in sn):.1f}x-"
            f"{max(naive[tuple(r['shape'])]['fwd_bwd_us'] / r['fwd_bwd_us'] for r in sn):.1f}x; "
            f"normkit BN speed-up over nn.BatchNorm2d (fwd+bwd) "
            f"{min(1 / r['fwd_bwd_ratio_bn'] for r in bn):.2f}x-{max(1 / r['fwd_bwd_ratio_bn'] for r in bn):.2f}x"
        )
        if all("peak_step_over_x" in r for r in sn):
            ref = {tuple(r["shape"]): r for r in pick(REFERENCE, fmt)}
            out.append(
                "  peak step memory, SN / nn.BatchNorm2d: "
                + ", ".join(
                    f"{r['peak_step_bytes'] / ref[tuple(r['shape'])]['peak_step_bytes']:.2f}" for r in sn
                )
            )
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repetitions, no torch.compile")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 25)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--shapes", default=None, help="e.g. 32x64x32x32,4x512x7x7 (default: the five)")
    parser.add_argument("--formats", default="nchw,channels_last")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (5 if args.quick else 25)
    compile_sn = not (args.quick or args.no_compile)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    warnings.filterwarnings("ignore")
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "normkit_backend": normkit.get_backend(),
        "reps": reps,
    }
    try:
        with open("/proc/cpuinfo") as f:
            machine["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# normkit benchmark: {machine}", flush=True)
    rows: list[dict] = []
    for shape in shapes:
        for fmt in args.formats.split(","):
            new = run_shape(shape, fmt, reps, compile_sn, not args.no_memory)
            rows += new
            print(markdown(new).split("\n", 2)[2], flush=True)
    print()
    print(markdown(rows))
    print()
    print(summary(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
