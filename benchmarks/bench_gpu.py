"""Speed of normkit on a CUDA GPU (its Triton path) against cuDNN BatchNorm and PyTorch's GroupNorm.

What is timed, per shape, dtype and memory format, in training mode:

* ``normkit SN``: :class:`normkit.SwitchNorm2d` (IN+LN+BN), ``normkit BN``:
  :class:`normkit.BatchNorm2d`, ``normkit GN``: :class:`normkit.GroupNorm` (32 groups), all
  on the default backend (``auto``: the Triton kernels on CUDA);
* ``nn.BatchNorm2d`` (cuDNN: every ratio is to it) and ``nn.GroupNorm`` (32 groups);
* ``SN passes``: the kernel set's four full-size passes alone (moments + apply; reduce +
  backward_apply), i.e. SN without its O(N*C) mixing graph and that graph's small launches;
* ``copy``: ``x.clone()``, the bandwidth reachable in the same run.

Timing: each call between two CUDA events, with the GPU idle and the L2 cache flushed before
it (so it is the time a user waits for one call, launch overhead included), after warm-up
calls (which also compile the Triton kernels); the median is reported. Parameters stay float32
whatever the input dtype, as under autocast (a torch layer that refuses mixed dtypes is cast to
the input's dtype, and the row says so).

Bytes model (the minimum traffic of a normalization; parameters and (N, C) statistics are
negligible): forward reads x and writes y, ``2 * bytes(x)``; forward+backward adds reading x
and dy and writing dx, ``5 * bytes(x)``. Bandwidth is that count over the time, as a fraction
of the H200's HBM peak (4.8 TB/s, ``--peak-tbs``). normkit's four passes move more: forward
reads x twice (moments, apply) and writes y, ``3 * bytes(x)``; backward reads dy and x twice
(reduce, backward_apply) and writes dx, ``5 * bytes(x)``; so ``8 * bytes(x)`` in all, and
against the minimum model they can show at most 2/3 (forward) and 5/8 (forward+backward) of
the bandwidth they really move (the ``moved`` columns count their own traffic).

Also here: a ResNet-50 (written out below, no torchvision) training step with SN, normkit BN
and ``nn.BatchNorm2d``, and a torch-profiler breakdown of one layer step (kernel launches,
GPU kernel time, top kernels). ``benchmarks/gpu_check.py`` runs all of it as its timing
phase; this file alone prints the layer tables::

    python benchmarks/bench_gpu.py                       # five shapes, float32 and bfloat16
    python benchmarks/bench_gpu.py --resnet --json gpu.json

Without CUDA it prints a message and exits with status 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normkit  # noqa: E402
from normkit import kernels  # noqa: E402

BENCH_SHAPES = [(32, 64, 32, 32), (8, 256, 14, 14), (2, 64, 56, 56), (128, 128, 8, 8), (4, 512, 7, 7)]
# (C, H, W) of every normalization layer in ResNet-50 (v1.5: the stride sits on the 3x3 conv).
RESNET50_NORM_CHW = [
    (64, 112, 112),
    (64, 56, 56), (256, 56, 56), (128, 56, 56),
    (128, 28, 28), (512, 28, 28), (256, 28, 28),
    (256, 14, 14), (1024, 14, 14), (512, 14, 14),
    (512, 7, 7), (2048, 7, 7),
]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE = "nn.BatchNorm2d"
LAYER_VARIANTS = ("normkit SN", "normkit BN", "normkit GN", "nn.BatchNorm2d", "nn.GroupNorm", "SN passes")
H200_HBM_TBS = 4.8
FWD_BYTES, FWD_BWD_BYTES = 2, 5  # minimum traffic, multiples of bytes(x) (module docstring)
MOVED_FWD, MOVED_FWD_BWD = 3, 8  # what normkit's four passes move
NORMKIT_VARIANTS = ("normkit SN", "normkit BN", "normkit GN", "SN passes")
LARGE_BYTES = 32 * 2**20  # inputs at least this big are "large" for the bandwidth goal (L2 is 60 MB)
GROUPS = 32


def resnet50_shapes(batch: int) -> list[tuple[int, int, int, int]]:
    return [(batch, *chw) for chw in RESNET50_NORM_CHW]


def shape_label(shape) -> str:
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------- timing


class Timer:
    """Median time of a call in microseconds: CUDA events on a GPU (idle GPU, L2 flushed
    before each call), ``time.perf_counter`` on the CPU (the dry run)."""

    def __init__(self, device: torch.device, flush_bytes: int = 256 * 2**20):
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = torch.empty(flush_bytes // 4, device=device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median_us(self, fn: Callable[[], object], reps: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self._flush is not None:
                self._flush.zero_()
                self.sync()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)


def layer_closures(module: nn.Module, x: Tensor, dy: Tensor) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of a layer in training mode."""
    xg = x.detach().clone().requires_grad_()

    def forward():
        with torch.no_grad():
            return module(x)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).backward(dy)

    return forward, forward_backward


def passes_closures(kset: kernels.KernelSet, x: Tensor, dy: Tensor) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of a kernel set's four full-size passes alone."""
    n, c = x.shape[:2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.ones(n, c, device=x.device, dtype=dtype)
    shift = torch.zeros(c, device=x.device, dtype=dtype)
    p = q = torch.zeros(n, c, device=x.device, dtype=dtype)

    def forward():
        mean, _ = kset.moments(x, 1)
        return kset.apply(x, mean, scale, shift, 1)

    def forward_backward():
        mean, _ = kset.moments(x, 1)
        kset.apply(x, mean, scale, shift, 1)
        kset.reduce(dy, x, mean, 1)
        return kset.backward_apply(dy, x, mean, scale, p, q, 1)

    return forward, forward_backward


def _amp_module(module: nn.Module, x: Tensor) -> tuple[nn.Module, str]:
    """``module`` with float32 parameters if it takes x's dtype so, else cast to x's dtype."""
    module = module.to(x.device).train()
    try:
        with torch.no_grad():
            module(x)
        return module, "float32"
    except RuntimeError:
        return module.to(x.dtype), str(x.dtype).replace("torch.", "")


def _layer_modules(c: int) -> dict[str, nn.Module]:
    return {
        "normkit SN": normkit.SwitchNorm2d(c),
        "normkit BN": normkit.BatchNorm2d(c),
        "normkit GN": normkit.GroupNorm(GROUPS, c),
        "nn.BatchNorm2d": nn.BatchNorm2d(c),
        "nn.GroupNorm": nn.GroupNorm(GROUPS, c),
    }


def measure_config(shape, dtype_name: str, fmt_name: str, timer: Timer, reps: int, warmup: int) -> list[dict]:
    """One row per variant (and the copy) for one input configuration."""
    device, dtype, fmt = timer.device, DTYPES[dtype_name], FORMATS[fmt_name]
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    rows = []
    with normkit.use_backend("auto"):
        for name, module in _layer_modules(shape[1]).items():
            module, params = _amp_module(module, x)
            fwd, fwd_bwd = layer_closures(module, x, dy)
            rows.append({"variant": name, "params": params, "fwd_us": timer.median_us(fwd, reps, warmup),
                         "fwd_bwd_us": timer.median_us(fwd_bwd, reps, warmup)})
        kset = kernels.select(x)
        if kset is not None and kset.supports(x, 1) is None:
            fwd, fwd_bwd = passes_closures(kset, x, dy)
            rows.append({"variant": "SN passes", "params": f"{kset.name} passes", "fwd_us": timer.median_us(fwd, reps, warmup),
                         "fwd_bwd_us": timer.median_us(fwd_bwd, reps, warmup)})
    copy_us = timer.median_us(lambda: x.clone(memory_format=torch.preserve_format), reps, warmup)
    for r in rows:
        r.update(shape=list(shape), dtype=dtype_name, format=fmt_name, bytes_x=x.numel() * x.element_size(),
                 copy_us=copy_us)
    return rows


def derive(rows: list[dict], peak_tbs: float = H200_HBM_TBS) -> list[dict]:
    """Ratios to ``nn.BatchNorm2d`` of the same configuration and bandwidth fractions of the
    peak (bytes model in the module docstring); rows are updated in place."""
    by_config: dict[tuple, dict] = {}
    for r in rows:
        by_config.setdefault((tuple(r["shape"]), r["dtype"], r["format"]), {})[r["variant"]] = r
    peak = peak_tbs * 1e12
    for group in by_config.values():
        ref = group.get(REFERENCE)
        for r in group.values():
            nbytes = r["bytes_x"]
            r["fwd_ratio"] = r["fwd_us"] / ref["fwd_us"] if ref else None
            r["fwd_bwd_ratio"] = r["fwd_bwd_us"] / ref["fwd_bwd_us"] if ref else None
            r["fwd_peak"] = FWD_BYTES * nbytes / (r["fwd_us"] * 1e-6) / peak
            r["fwd_bwd_peak"] = FWD_BWD_BYTES * nbytes / (r["fwd_bwd_us"] * 1e-6) / peak
            r["copy_peak"] = 2 * nbytes / (r["copy_us"] * 1e-6) / peak
            if r["variant"] in NORMKIT_VARIANTS:
                r["fwd_moved_peak"] = MOVED_FWD * nbytes / (r["fwd_us"] * 1e-6) / peak
                r["fwd_bwd_moved_peak"] = MOVED_FWD_BWD * nbytes / (r["fwd_bwd_us"] * 1e-6) / peak
    return rows


# --------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.norm1 = nn.Conv2d(cin, width, 1, bias=False), norm(width)
        self.conv2, self.norm2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), norm(width)
        self.conv3, self.norm3 = nn.Conv2d(width, cout, 1, bias=False), norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def resnet50(norm: Callable[[int], nn.Module], classes: int = 1000, width: int = 64,
             blocks: tuple = (3, 4, 6, 3)) -> nn.Module:
    """ResNet-50 with ``norm(channels)`` as every norm layer; ``width`` (the stem's channels,
    64) and ``blocks`` (bottlenecks per stage, 3, 4, 6, 3) smaller make a small model of the
    same structure."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), norm(width), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = width
    for stage, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
        for i in range(count):
            layers.append(Bottleneck(cin, width << stage, stride if i == 0 else 1, norm))
            cin = (width << stage) * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


RESNET_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "normkit SN": normkit.SwitchNorm2d,
    "normkit BN": normkit.BatchNorm2d,
    "nn.BatchNorm2d": nn.BatchNorm2d,
}


def measure_resnet(norm_name: str, precision: str, batch: int, resolution: int, timer: Timer, reps: int,
                   warmup: int, width: int = 64, blocks: tuple = (3, 4, 6, 3)) -> dict:
    """Median time of one training step (forward, cross-entropy, backward, SGD step) of a
    channels_last ResNet-50; ``precision``: 'float32' or 'bfloat16' (autocast)."""
    device = timer.device
    torch.manual_seed(0)
    model = resnet50(RESNET_NORMS[norm_name], width=width, blocks=blocks).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    amp = precision == "bfloat16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()

    with normkit.use_backend("auto"):
        if timer.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        us = timer.median_us(step, reps, warmup)
        peak = torch.cuda.max_memory_allocated(device) if timer.cuda else 0
    return {"norm": norm_name, "precision": precision, "batch": batch, "resolution": resolution, "width": width,
            "blocks": list(blocks),
            "step_ms": us / 1e3, "images_per_s": batch / (us * 1e-6), "peak_bytes": peak}


def derive_resnet(rows: list[dict]) -> list[dict]:
    for r in rows:
        ref = next((o for o in rows if o["norm"] == REFERENCE and o["precision"] == r["precision"]
                    and o["batch"] == r["batch"]), None)
        r["ratio"] = r["step_ms"] / ref["step_ms"] if ref else None
    return rows


# --------------------------------------------------------------------------- profile


def profile_layer(name: str, shape, dtype_name: str, fmt_name: str, device: torch.device, steps: int,
                  top: int = 8) -> dict:
    """torch-profiler breakdown of ``steps`` forward+backward steps of one layer variant:
    GPU kernels launched and their total time per step, wall time per step, the top kernels
    (on the CPU, without kernels: the aten ops)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(shape, device=device, dtype=DTYPES[dtype_name]).contiguous(memory_format=FORMATS[fmt_name])
    dy = torch.randn_like(x)
    module, _ = _amp_module(_layer_modules(shape[1])[name], x)
    _, fwd_bwd = layer_closures(module, x, dy)
    cuda = device.type == "cuda"
    with normkit.use_backend("auto"):
        for _ in range(3):
            fwd_bwd()
        if cuda:
            torch.cuda.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                fwd_bwd()
            if cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
    events = [e for e in prof.events() if (_is_kernel(e) if cuda else e.name.startswith("aten::"))]
    totals: dict[str, list] = {}
    for e in events:
        entry = totals.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += _device_us(e) if cuda else e.cpu_time_total
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "variant": name, "shape": list(shape), "dtype": dtype_name, "format": fmt_name, "steps": steps,
        "launches_per_step": len(events) / steps, "device": device.type,
        "kernel_us_per_step": sum(v[1] for v in totals.values()) / steps if cuda else None,
        "wall_us_per_step": wall * 1e6 / steps,
        "top": [{"name": k[:90], "calls_per_step": v[0] / steps, "us_per_step": v[1] / steps} for k, v in ranked],
    }


def _is_kernel(event) -> bool:
    kind = getattr(event, "device_type", None)
    return kind is not None and kind == torch.autograd.DeviceType.CUDA


def _device_us(event) -> float:
    return float(event.time_range.elapsed_us())  # a kernel event's own span on the GPU


# --------------------------------------------------------------------------- tables


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def layer_tables(rows: list[dict], peak_tbs: float = H200_HBM_TBS) -> str:
    """Markdown: per dtype and format, forward+backward and forward times (us) of every
    variant, SN's ratio to cuDNN BN and SN's and the copy's fraction of the HBM peak."""
    out = []
    configs: dict[tuple, dict[tuple, dict]] = {}
    for r in rows:
        configs.setdefault((r["dtype"], r["format"]), {}).setdefault(tuple(r["shape"]), {})[r["variant"]] = r
    for (dtype, fmt), shapes in configs.items():
        for key, label in (("fwd_bwd", "forward+backward"), ("fwd", "forward")):
            out.append(f"\n#### {dtype}, {fmt}: {label}, us (median)\n")
            out.append("| shape | " + " | ".join(LAYER_VARIANTS)
                       + f" | SN / BN | SN % of {peak_tbs:g} TB/s | SN moved % | copy % |")
            out.append("|---|" + "---:|" * (len(LAYER_VARIANTS) + 4))
            for shape, variants in shapes.items():
                cells = [_fmt(variants[v][f"{key}_us"], ".1f") if v in variants else "-" for v in LAYER_VARIANTS]
                sn = variants.get("normkit SN")
                any_row = next(iter(variants.values()))
                out.append(
                    f"| {shape_label(shape)} | " + " | ".join(cells)
                    + f" | {_fmt(sn and sn[f'{key}_ratio'], '.2f')} | {_fmt(sn and 100 * sn[f'{key}_peak'], '.0f')}"
                    + f" | {_fmt(sn and 100 * sn[f'{key}_moved_peak'], '.0f')}"
                    + f" | {100 * any_row['copy_peak']:.0f} |"
                )
    return "\n".join(out)


def goals(rows: list[dict], limit: float = 1.2, moonshot: float = 1.0, bandwidth: float = 0.6) -> dict:
    """The speed goals, shape by shape: SN forward+backward <= ``limit`` x cuDNN BN (<=
    ``moonshot`` the moonshot), and >= ``bandwidth`` of the HBM peak on large inputs."""
    sn = [r for r in rows if r["variant"] == "normkit SN" and r.get("fwd_bwd_ratio") is not None]
    large = [r for r in sn if r["bytes_x"] >= LARGE_BYTES]
    label = lambda r: f"{shape_label(r['shape'])} {r['dtype']} {r['format']}"  # noqa: E731
    return {
        "configs": len(sn),
        "ratio_limit": limit,
        "over_limit": [label(r) for r in sn if r["fwd_bwd_ratio"] > limit],
        "over_moonshot": [label(r) for r in sn if r["fwd_bwd_ratio"] > moonshot],
        "worst_ratio": max((r["fwd_bwd_ratio"] for r in sn), default=None),
        "large_configs": len(large),
        "bandwidth_goal": bandwidth,
        "under_bandwidth": [f"{label(r)} ({100 * r['fwd_bwd_peak']:.0f}%)" for r in large if r["fwd_bwd_peak"] < bandwidth],
        "under_bandwidth_moved": [f"{label(r)} ({100 * r['fwd_bwd_moved_peak']:.0f}%)" for r in large
                                  if r["fwd_bwd_moved_peak"] < bandwidth],
    }


def goals_markdown(g: dict) -> str:
    def listing(items: list[str]) -> str:
        return "none" if not items else f"{len(items)}: " + ", ".join(items)

    return "\n".join([
        "| goal | configurations | missed |",
        "|---|---:|---|",
        f"| SN fwd+bwd <= {g['ratio_limit']}x cuDNN BN | {g['configs']} | {listing(g['over_limit'])} |",
        f"| moonshot: SN fwd+bwd <= 1.0x cuDNN BN | {g['configs']} | {listing(g['over_moonshot'])} |",
        f"| SN fwd+bwd >= {100 * g['bandwidth_goal']:.0f}% of HBM peak, inputs >= {LARGE_BYTES >> 20} MiB "
        f"| {g['large_configs']} | {listing(g['under_bandwidth'])} |",
        f"| the same, counting the traffic the passes move ({MOVED_FWD_BWD} x bytes(x)) "
        f"| {g['large_configs']} | {listing(g['under_bandwidth_moved'])} |",
        "",
        f"Worst SN / BN forward+backward ratio: {_fmt(g['worst_ratio'], '.2f')}.",
    ])


def resnet_table(rows: list[dict]) -> str:
    out = ["| norm | precision | batch | resolution | step ms | x nn.BatchNorm2d | images/s | peak GiB |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['norm']} | {r['precision']} | {r['batch']} | {r['resolution']} | {r['step_ms']:.2f} | "
                   f"{_fmt(r.get('ratio'), '.2f')} | {r['images_per_s']:.0f} | {r['peak_bytes'] / 2**30:.2f} |")
    return "\n".join(out)


def profile_markdown(p: dict) -> str:
    head = (f"#### {p['variant']}, {shape_label(p['shape'])} {p['dtype']} {p['format']} "
            f"(forward+backward, {p['steps']} steps)\n\n"
            f"{'kernel launches' if p['device'] == 'cuda' else 'aten ops'} per step: {p['launches_per_step']:.0f}; "
            f"GPU kernel time per step: {_fmt(p['kernel_us_per_step'], '.1f')} us; "
            f"wall per step: {p['wall_us_per_step']:.1f} us\n")
    lines = ["| kernel | calls / step | us / step |", "|---|---:|---:|"]
    lines += [f"| `{t['name']}` | {t['calls_per_step']:.0f} | {t['us_per_step']:.1f} |" for t in p["top"]]
    return head + "\n" + "\n".join(lines)


# --------------------------------------------------------------------------- command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20, help="timed calls per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--resnet", action="store_true", help="add ResNet-50's norm shapes at batch 2 and 32")
    parser.add_argument("--peak-tbs", type=float, default=H200_HBM_TBS, help="HBM peak of the GPU, TB/s")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available, nothing to measure (the Triton kernels need a GPU).")
        return 0
    if kernels.load("triton") is None:
        print("bench_gpu: the Triton kernels cannot be loaded; install them with pip install 'normkit[triton]'.")
        return 0
    timer = Timer(torch.device("cuda"))
    shapes = BENCH_SHAPES + (resnet50_shapes(2) + resnet50_shapes(32) if args.resnet else [])
    rows = []
    for dtype in args.dtypes.split(","):
        for fmt in FORMATS:
            for shape in shapes:
                rows.extend(measure_config(shape, dtype, fmt, timer, args.reps, args.warmup))
    derive(rows, args.peak_tbs)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.reps} calls")
    print(layer_tables(rows, args.peak_tbs))
    print()
    print(goals_markdown(goals(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
