"""Speed of normkit's Triton path against cuDNN BatchNorm on a CUDA GPU.

For each shape and memory format, times (median of CUDA-event timings, training mode):

* ``normkit SN``: :class:`normkit.SwitchNorm2d` (IN+LN+BN) on the Triton kernels;
* ``normkit BN``: :class:`normkit.BatchNorm2d` on the Triton kernels;
* ``SN kernels``: the four Triton passes alone (moments + apply forward; reduce +
  backward_apply for forward+backward), i.e. SN without the O(N*C) mixing graph and its
  small launches, the part a CUDA graph or ``torch.compile`` would hide;
* ``nn.BatchNorm2d`` (cuDNN, the reference for every ratio) and ``nn.GroupNorm(32)``;
* ``copy``: ``torch.clone`` of x, for the bandwidth the same run reaches.

forward and forward+backward, with ratios to ``nn.BatchNorm2d``, effective bandwidth
(``2 * bytes(x)`` forward, ``5 * bytes(x)`` forward+backward, as in ``bench_norms.py``) as
a fraction of the copy's, and the peak memory of one training step.

Usage::

    python benchmarks/bench_gpu.py                       # float32, all shapes
    python benchmarks/bench_gpu.py --dtype bfloat16 --json gpu.json --reps 50

Without CUDA it prints a message and exits with status 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normkit  # noqa: E402

SHAPES = [(32, 64, 32, 32), (8, 256, 14, 14), (2, 64, 56, 56), (128, 128, 8, 8), (4, 512, 7, 7), (64, 256, 56, 56)]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
REFERENCE = "nn.BatchNorm2d"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cuda_median_us(fn: Callable[[], object], reps: int, warmup: int = 5) -> float:
    """Median time of ``fn`` in microseconds, each call between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def layer_steps(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures of a layer in training mode."""
    xg = x.detach().clone().requires_grad_()

    def forward():
        with torch.no_grad():
            return module(x)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).backward(dy)

    return forward, forward_backward


def kernel_steps(x: torch.Tensor, dy: torch.Tensor) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures of the four Triton passes alone."""
    from normkit.kernels.triton import TRITON_KERNELS as K

    n, c = x.shape[:2]
    mu = torch.zeros(n, c, device=x.device)
    scale, shift, p, q = torch.ones(n, c, device=x.device), torch.zeros(c, device=x.device), mu, mu

    def forward():
        mean, _ = K.moments(x, 1)
        return K.apply(x, mean, scale, shift, 1)

    def forward_backward():
        mean, _ = K.moments(x, 1)
        K.apply(x, mean, scale, shift, 1)
        K.reduce(dy, x, mean, 1)
        return K.backward_apply(dy, x, mean, scale, p, q, 1)

    return forward, forward_backward


def peak_step_bytes(module: Optional[nn.Module], x: torch.Tensor, dy: torch.Tensor) -> int:
    """Peak memory allocated during one training step, beyond x, dy and the parameters."""
    if module is None:
        return 0
    xg = x.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(xg).backward(dy)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_shape(shape, fmt, dtype, reps) -> list[dict]:
    device = torch.device("cuda")
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    c = shape[1]
    modules = {
        "normkit SN": normkit.SwitchNorm2d(c),
        "normkit BN": normkit.BatchNorm2d(c),
        REFERENCE: nn.BatchNorm2d(c),
        "nn.GroupNorm(32)": nn.GroupNorm(32, c),
    }
    rows = []
    with normkit.use_backend("triton"):
        for name, m in modules.items():
            m = m.to(device=device, dtype=dtype).train()
            fwd, fwd_bwd = layer_steps(m, x, dy)
            rows.append({"variant": name, "fwd_us": cuda_median_us(fwd, reps),
                         "fwd_bwd_us": cuda_median_us(fwd_bwd, reps), "peak_bytes": peak_step_bytes(m, x, dy)})
        fwd, fwd_bwd = kernel_steps(x, dy)
        rows.append({"variant": "SN kernels", "fwd_us": cuda_median_us(fwd, reps),
                     "fwd_bwd_us": cuda_median_us(fwd_bwd, reps), "peak_bytes": 0})
    copy_us = cuda_median_us(lambda: x.clone(memory_format=torch.preserve_format), reps)
    nbytes = x.numel() * x.element_size()
    copy_gbs = 2 * nbytes / copy_us / 1e3
    ref = next(r for r in rows if r["variant"] == REFERENCE)
    for r in rows:
        r.update(
            shape=list(shape), format=[k for k, v in FORMATS.items() if v == fmt][0], dtype=str(dtype),
            fwd_ratio=r["fwd_us"] / ref["fwd_us"], fwd_bwd_ratio=r["fwd_bwd_us"] / ref["fwd_bwd_us"],
            fwd_gbs=2 * nbytes / r["fwd_us"] / 1e3, fwd_bwd_gbs=5 * nbytes / r["fwd_bwd_us"] / 1e3,
            copy_us=copy_us, copy_gbs=copy_gbs,
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | format | variant | fwd us | x BN | fwd+bwd us | x BN | fwd+bwd GB/s (% copy) | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {','.join(map(str, r['shape']))} | {r['format']} | {r['variant']} | {r['fwd_us']:.1f} | "
            f"{r['fwd_ratio']:.2f} | {r['fwd_bwd_us']:.1f} | {r['fwd_bwd_ratio']:.2f} | "
            f"{r['fwd_bwd_gbs']:.0f} ({100 * r['fwd_bwd_gbs'] / r['copy_gbs']:.0f}%) | {r['peak_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="timed calls per variant (median reported)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--shapes", default=None, help="e.g. '32,64,32,32;8,256,14,14' (default: the standard six)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available, nothing to measure (the Triton kernels need a GPU).")
        return 0
    from normkit import kernels

    if kernels.load("triton") is None:
        print("bench_gpu: the Triton kernels cannot be loaded; install them with pip install 'normkit[triton]'.")
        return 0
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    rows = []
    for shape in shapes:
        for fmt in FORMATS.values():
            rows.extend(run_shape(shape, fmt, DTYPES[args.dtype], args.reps))
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, {args.dtype}, median of {args.reps} calls\n")
    print(markdown(rows))
    if args.json:
        report = {"device": props.name, "torch": torch.__version__, "dtype": args.dtype, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
