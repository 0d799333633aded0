"""normkit's one-command GPU check: correctness on the device, then timing, then a summary.

``benchmarks/gpu_check.sh`` runs the phases, each in its own process and time box; each
phase keeps its results under ``--out`` (JSON, and markdown tables made from it) up to date
as it goes, so a crash or a kill keeps everything finished before it, and writes
``summary.md`` when it ends.

Correctness (``--phase correctness``): every layer configuration of the test table
(``tests/common_layers.py``; kinds of the registry that the table lacks are built with
``create_norm``'s registry) in float32, bfloat16 and float16, channels-first,
``channels_last`` and the channels on the last axis (float32 also as (N, C, L), (N, C) and
``channels_last_3d``, and long rows that split over programs), with and without masks,
in training and in eval, forward and backward, against normkit's reference path in float64
on the same device, whose inputs and parameters are the same values. Each layer check also
counts the calls of the kernel set's passes, which proves which backend ran. Then:
the reference path against the independent definitions of ``tests/reference.py``; a small
CNN with SN under autocast (bfloat16, float16) and under ``torch.compile``; and
``torch.library.opcheck`` of normkit's operators on the device (where a kernel for it is
registered) and on the CPU. ``--quick`` checks a subset in which every configuration meets
every dtype, layout, mode, mask and parameter choice.

Tolerances: ``|got - want| <= atol * max(1, max|want|) + rtol * |want|`` per output, with
(rtol, atol) = (1e-4, 1e-4) in float32, (5e-3, 5e-3) in float16 (10 units of roundoff),
(2e-2, 2e-2) in bfloat16 (5 units), 1e-10 in float64. TF32 is off during this phase.

Timing (``--phase timing``): ``bench_gpu.py``'s layer tables, ResNet-50 training step and
profile. Summary (``--phase summary``): environment, verdict, goals, in ``summary.md``.

Exit status: 0 every correctness check passed (or does not apply on this machine); 1 a
check failed; 3 the time limit stopped the phase before every check ran; 4 the device
context was lost (run again with ``--resume``: finished checks are kept).

``--dry-run`` runs the same phases on the CPU with small shapes (the Triton kernels in
Triton's interpreter: set ``TRITON_INTERPRET=1``), which is how the tests check this script.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402
import normkit  # noqa: E402
from normkit import kernels  # noqa: E402

PASSES = ("moments", "apply", "reduce", "backward_apply", "layer")
TOLERANCES = {  # (rtol, atol); see the module docstring
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float64: (1e-10, 1e-10),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DONE = ("pass", "fail", "error", "n/a", "crashed")  # statuses a resumed phase keeps (not "skipped")
EXIT_FAILED, EXIT_INCOMPLETE, EXIT_CONTEXT_LOST = 1, 3, 4


class CheckFailed(AssertionError):
    """A result outside its tolerance (or a wrong route, dtype or layout)."""


class NotApplicable(Exception):
    """The check has nothing to test on this machine (the reason is recorded)."""


# --------------------------------------------------------------------------- environment


def _command_output(cmd: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the machine, for the results' headers."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, Any] = {
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
        "normkit": normkit.__version__,
        "normkit_commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "kernels_status": kernels.status(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"])
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), nvidia_smi=smi,
                   driver=smi.split(",")[1].strip() if smi and smi.count(",") >= 1 else None)
    else:
        env.update(gpu=None, driver=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


# --------------------------------------------------------------------------- recording


class Recorder:
    """The records of one phase in ``<out>/<phase>.json`` (and its markdown), rewritten at
    most every ``FLUSH_SECONDS`` and at the end, so that a crash or a kill keeps the checks
    finished before it; ``<out>/current_check.txt`` names the check in progress (a resumed
    phase records the check a dead process was in as crashed) and is removed at the end."""

    FLUSH_SECONDS = 2.0

    def __init__(self, out: Path, phase: str, env: dict, deadline: float, render: Callable[[dict], str],
                 resume: bool = False, device: Optional[torch.device] = None):
        self.path, self.md_path = out / f"{phase}.json", out / f"{phase}.md"
        self.marker = out / "current_check.txt"
        self.phase, self.deadline, self.render, self.device = phase, deadline, render, device
        self.records: dict[str, dict] = {}
        self.data: dict[str, Any] = {}
        if resume and self.path.exists():
            previous = json.loads(self.path.read_text())
            self.records = {n: r for n, r in previous.get("records", {}).items() if r["status"] in DONE}
            self.data = previous.get("data", {})
            died_in = self.marker.read_text().strip() if self.marker.exists() else None
            if died_in and died_in not in self.records:
                self.records[died_in] = {"status": "crashed", "detail": "the process died during this check"}
        self.env = env
        self.stopped: Optional[str] = None  # why the remaining checks do not run
        self.flush()

    def flush(self) -> None:
        doc = {"phase": self.phase, "environment": self.env, "records": self.records, "data": self.data,
               "stopped": self.stopped}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.path)
        self.md_path.write_text(self.render(doc))
        self._flushed = time.monotonic()

    def finish(self) -> None:
        self.flush()
        self.marker.unlink(missing_ok=True)

    def run(self, name: str, fn: Callable[[], Optional[dict]], needs: float = 0.0, **meta: Any) -> dict:
        """Run one check and record its outcome (pass, fail, error, n/a, skipped);
        ``needs``: the seconds it may take, which must be left before the deadline."""
        if name in self.records:
            return self.records[name]
        if self.stopped is None and time.monotonic() > self.deadline:
            self.stopped = "time limit"
        if self.stopped is not None or time.monotonic() + needs > self.deadline:
            detail = self.stopped or f"less than the {needs:.0f} s it needs was left"
            self.records[name] = rec = {**meta, "status": "skipped", "detail": detail}
            return rec
        self.marker.write_text(name)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rec = {**meta, **(fn() or {}), "status": "pass"}
            except CheckFailed as exc:
                rec = {**meta, "status": "fail", "detail": str(exc)}
            except NotApplicable as exc:
                rec = {**meta, "status": "n/a", "detail": str(exc)}
            except Exception:  # noqa: BLE001 - every other check must still run
                rec = {**meta, "status": "error", "detail": traceback.format_exc(limit=8)}
        rec["seconds"] = round(time.perf_counter() - start, 3)
        if caught:
            rec["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:5]
        self.records[name] = rec
        if rec["status"] == "error" and not self._device_alive():
            self.stopped = f"the device context was lost in {name}"
        if self.stopped or rec["status"] != "pass" or time.monotonic() - self._flushed > self.FLUSH_SECONDS:
            self.flush()
        return rec

    def _device_alive(self) -> bool:
        if self.device is None or self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).sum().item()
            return True
        except Exception:  # noqa: BLE001 - any CUDA error here means the context is gone
            return False

    def exit_status(self) -> int:
        statuses = [r["status"] for r in self.records.values()]
        if self.stopped is not None and self.stopped.startswith("the device context"):
            return EXIT_CONTEXT_LOST
        if any(s in ("fail", "error", "crashed") for s in statuses):
            return EXIT_FAILED
        if any(s == "skipped" for s in statuses):
            return EXIT_INCOMPLETE
        return 0


# --------------------------------------------------------------------------- which kernels ran


@contextlib.contextmanager
def counting_passes(backend: str) -> Iterator[dict[str, int]]:
    """Counts the calls of the passes (and the whole-layer kernel) of the kernel set that
    ``backend`` names, while the block runs: the proof of which kernels served a call.

    The dispatcher fetches the set through ``kernels.load`` on every call, so the counting
    copy stands in the loaded-set cache for the duration of the block."""
    calls = dict.fromkeys(PASSES, 0)
    original = kernels.load(backend) if backend not in ("auto", "reference") else None
    if original is None:
        yield calls
        return

    def counted(name: str, fn: Optional[Callable]) -> Optional[Callable]:
        if fn is None:
            return None

        def wrapper(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)

        return wrapper

    stand_in = original._replace(**{name: counted(name, getattr(original, name)) for name in PASSES})
    kernels._loaded[backend] = stand_in
    try:
        yield calls
    finally:
        kernels._loaded[backend] = original


# --------------------------------------------------------------------------- comparing


def compare(got: dict[str, Tensor], want: dict[str, Tensor], dtype: torch.dtype) -> dict[str, float]:
    """Each output's worst error as a fraction of its tolerance (> 1: out of tolerance).

    Raises CheckFailed naming every output out of tolerance, a NaN where the float64 result
    has none, or a missing or extra output."""
    if got.keys() != want.keys():
        raise CheckFailed(f"outputs differ: got {sorted(got)}, the reference has {sorted(want)}")
    rtol, atol = TOLERANCES[dtype]
    margins, bad = {}, []
    for key, w in want.items():
        g, w = got[key].detach().double(), w.detach().double()
        if g.shape != w.shape:
            raise CheckFailed(f"{key}: shape {tuple(g.shape)}, the reference has {tuple(w.shape)}")
        finite = torch.isfinite(w)
        if not torch.equal(torch.isfinite(g), finite):
            bad.append(f"{key}: non-finite values where the float64 result has finite ones, or the reverse")
            continue
        scale = max(1.0, float(w[finite].abs().max())) if finite.any() else 1.0
        bound = atol * scale + rtol * w.abs()
        err = torch.where(finite, (g - w).abs() / bound, torch.zeros_like(w))
        margins[key] = round(float(err.max()), 4) if err.numel() else 0.0
        if margins[key] > 1:
            worst = int(err.argmax())
            bad.append(f"{key}: max |error| / tolerance = {margins[key]:.3g} (at flat index {worst}: "
                       f"got {float(g.flatten()[worst]):.6g}, float64 {float(w.flatten()[worst]):.6g}; "
                       f"rtol {rtol}, atol {atol} x {scale:.3g})")
    if bad:
        raise CheckFailed("; ".join(bad))
    return margins


# --------------------------------------------------------------------------- the layer table


@dataclass
class Row:
    """A layer configuration to check: ``build(c, dim, axis, **kw)`` makes it."""

    name: str
    kind: str
    build: Callable[..., nn.Module]
    channels: Callable[[int], int]  # the channel count to use, given a preferred one
    masks: bool
    channels_axis: bool
    source: str  # where the row comes from: the test table or the registry
    sources: tuple = ()


def table_rows() -> list[Row]:
    """The test table's configurations, plus registry kinds it does not build."""
    rows: list[Row] = []
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        import common_layers as table
    except ImportError:
        table = None
    finally:
        sys.path.remove(str(ROOT / "tests"))
    if table is not None:
        for case in table.variants() + table.variants(table.LAYER_NORM_CASES):
            rows.append(Row(case.variant, case.kind, case.build, case.channels, case.masks, case.channels_axis,
                            "tests/common_layers.py", tuple(case.sources)))
            if case.running == "in" and not case.tracking:  # its tracking configuration too
                rows.append(Row(case.variant + "-tracked", case.kind,
                                lambda *a, _c=case, **kw: _c.build(*a, tracking=True, **kw),
                                case.channels, case.masks, case.channels_axis, "tests/common_layers.py",
                                tuple(case.sources)))
    built = {type(r.build(r.channels(12), 2, 1)) for r in rows if r.kind != "ln"}
    from normkit.nn.registry import KINDS

    for kind in KINDS:
        if kind.classes == (nn.Identity,) or set(kind.classes) & built:
            continue
        rows.append(Row(kind.name, kind.name, _registry_builder(kind), lambda c: c, True, True, "registry"))
    return rows


def _registry_builder(kind) -> Callable[..., nn.Module]:
    def build(c: Optional[int] = None, dim: Optional[int] = None, axis: Optional[int] = None, **kw) -> nn.Module:
        if axis not in (None, 1):
            kw["axis"] = axis
        return kind.create(c, dim=min(max(dim or 2, 1), 3), **kw)

    return build


@dataclass(frozen=True)
class Layout:
    """How a check lays out its input: spatial dims, channel axis, memory format."""

    name: str
    spatial: tuple
    axis: int = 1
    fmt: torch.memory_format = torch.contiguous_format
    batch: int = 4
    dtypes: tuple = ("float32", "bfloat16", "float16")
    kinds: Optional[tuple] = None  # None: every kind
    needs_channels_axis: bool = False

    def shape(self, c: int) -> tuple:
        if self.axis == -1:
            return (self.batch, *self.spatial, c)
        return (self.batch, c, *self.spatial)

    def fits(self, row: Row) -> bool:
        if self.kinds is not None and row.kind not in self.kinds and row.source != "registry":
            return False
        return row.channels_axis or not self.needs_channels_axis


def layouts(dry_run: bool) -> list[Layout]:
    small = (2, 3) if dry_run else (5, 6)
    length = math.prod(small)
    found = [
        Layout("nchw", small),
        Layout("channels_last", small, fmt=torch.channels_last),
        Layout("axis_last", small, axis=-1, needs_channels_axis=True),
        Layout("ncl", (length,), dtypes=("float32",)),
        Layout("nc", (), dtypes=("float32",), kinds=("sn", "ssn", "bn", "brn")),
        Layout("ncdhw_channels_last", (1, *small), fmt=torch.channels_last_3d, dtypes=("float32",),
               kinds=("sn", "ssn", "bn", "brn", "in", "gn")),
    ]
    if not dry_run:  # rows longer than one program's block: split over programs, partials merged
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            found.append(Layout(f"long_{fmt_name}", (64, 64), fmt=fmt, batch=2, dtypes=("float32", "bfloat16"),
                                kinds=("sn", "bn", "gn")))
    return found


@dataclass(frozen=True)
class Unit:
    row: Row
    layout: Layout
    dtype: str
    train: bool
    masked: bool = False
    params: str = "float32"  # 'float32' (as under autocast) or 'same' (the module in x's dtype)

    @property
    def name(self) -> str:
        parts = ["layer", self.row.name, self.dtype, self.layout.name, "train" if self.train else "eval"]
        if self.masked:
            parts.append("masked")
        if self.params != "float32":
            parts.append(f"params-{self.params}")
        return "/".join(parts)

    def meta(self) -> dict:
        return {"check": "layer", "row": self.row.name, "row_source": self.row.source, "dtype": self.dtype,
                "layout": self.layout.name, "mode": "train" if self.train else "eval", "masked": self.masked,
                "params": self.params}


def layer_units(rows: list[Row], dry_run: bool) -> list[Unit]:
    units = []
    for row in rows:
        for layout in layouts(dry_run):
            if not layout.fits(row):
                continue
            for dtype in layout.dtypes:
                for train in (True, False):
                    units.append(Unit(row, layout, dtype, train))
                    if row.masks and row.channels_axis and layout.name in ("nchw", "channels_last"):
                        units.append(Unit(row, layout, dtype, train, masked=True))
                    if dtype != "float32" and layout.name == "nchw" and row.name in ("sn", "bn"):
                        units.append(Unit(row, layout, dtype, train, params="same"))
    return units


def covering(units: list[Unit], pairs: bool) -> list[Unit]:
    """A subset in which every value of each attribute appears (``pairs``: every row with
    every value of each other attribute): the quick and dry-run matrices."""
    covered: set = set()
    kept = []
    for u in units:
        values = {("layout", u.layout.name), ("dtype", u.dtype), ("train", u.train), ("masked", u.masked),
                  ("params", u.params)}
        features = {(u.row.name, v) for v in values} if pairs else values | {("row", u.row.name)}
        if features - covered:
            kept.append(u)
            covered |= features
    return kept


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Parameters and running statistics away from their initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(noise * (0.5 if "logits" in name else 0.3) + (1.0 if name.endswith("weight") else 0.0))
        for name, b in module.named_buffers():
            if b is not None and b.is_floating_point():
                noise = torch.randn(b.shape, generator=gen, dtype=torch.float64)
                b.copy_(noise.abs() * 0.5 + 0.5 if "var" in name else noise * 0.3)
    return module


def _step(module: nn.Module, x: Tensor, dy: Tensor, mask: Optional[Tensor], train: bool, backend: str) -> dict:
    """Output, input and parameter gradients, and floating buffers after one forward and
    backward of ``module`` in ``backend``."""
    module.train(train)
    xi = x.detach().clone().requires_grad_()
    with normkit.use_backend(backend):
        y = module(xi) if mask is None else module(xi, mask)
        y.backward(dy)
    out = {"y": y, "grad x": xi.grad}
    out.update({f"grad {k}": p.grad for k, p in module.named_parameters() if p.grad is not None})
    out.update({k: b for k, b in module.named_buffers() if b is not None and b.is_floating_point()})
    return out


def _mask_for(shape: tuple, axis: int, device: torch.device, gen: torch.Generator) -> Tensor:
    """Random positions valid (True), each sample with its first position valid."""
    rest = list(shape)
    del rest[axis]
    mask = torch.rand(rest, generator=gen) < 0.7
    mask.view(rest[0], -1)[:, 0] = True
    return mask.to(device)


def layer_check(unit: Unit, device: torch.device, backend: str) -> dict:
    row, layout, dtype = unit.row, unit.layout, DTYPES[unit.dtype]
    c = row.channels(12)
    shape = layout.shape(c)
    dim = len(layout.spatial)
    seed = zlib.crc32(unit.name.encode())  # the same inputs in every run
    gen = torch.Generator().manual_seed(seed)
    if row.kind == "ln":
        trailing = shape[-2:] if dim >= 2 else shape[-1:]
        module = row.build(normalized_shape=tuple(trailing))
    else:
        module = row.build(c, dim, layout.axis)
    module = _randomise(module, seed)
    if unit.params == "same":
        module = module.to(dtype)
    module = module.to(device)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    x = x.to(device).contiguous(memory_format=layout.fmt)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    mask = _mask_for(shape, layout.axis % len(shape), device, gen) if unit.masked else None
    with counting_passes(backend) as calls:
        got = _step(copy.deepcopy(module), x, dy, mask, unit.train, backend)
    want = _step(copy.deepcopy(module).double(), x.double(), dy.double(), mask, unit.train, "reference")
    # LayerNorm is torch's over trailing dims: its affine is applied by plain tensor ops, which
    # promote a half input with float32 parameters, and its output is contiguous.
    trailing = row.kind == "ln"
    want_dtype = torch.promote_types(dtype, next(module.parameters()).dtype) if trailing else dtype
    if got["y"].dtype != want_dtype:
        raise CheckFailed(f"output dtype {got['y'].dtype}, expected {want_dtype} (input {dtype})")
    if not trailing and layout.fmt is not torch.contiguous_format and not got["y"].is_contiguous(
            memory_format=layout.fmt):
        raise CheckFailed(f"output lost the input's memory format {layout.fmt} (strides {got['y'].stride()})")
    route = _route(calls, backend)
    if not unit.masked and route == "reference":
        raise CheckFailed(f"the {backend!r} kernels did not run (pass calls {calls}): the layer took the reference path")
    margins = compare(got, want, dtype)
    return {"margins": margins, "worst": max(margins.values(), default=0.0), "route": route,
            "calls": {k: v for k, v in calls.items() if v}, "shape": list(shape),
            "output_dtype": str(got["y"].dtype).replace("torch.", "")}


def _route(calls: dict[str, int], backend: str) -> str:
    if calls["layer"]:
        return f"{backend} layer kernel"
    if calls["moments"] and calls["apply"]:
        return f"{backend} passes" + ("" if calls["backward_apply"] else " (forward only)")
    return "reference"


# --------------------------------------------------------------------------- the other checks


def backend_check(device: torch.device, backend: str) -> dict:
    """The kernel set under test serves this device's tensors (and, on a GPU, is what
    'auto' picks), per ``normkit.kernels.status()`` and ``select``."""
    report = kernels.status()
    x = torch.randn(2, 4, 3, 3, device=device)
    with normkit.use_backend(backend):
        chosen = kernels.select(x)
        reason = None if chosen is None else chosen.supports(x, 1)
    if chosen is None or reason is not None:
        raise CheckFailed(f"backend {backend!r} serves no kernels for {device} tensors: {reason or report}")
    if device.type == "cuda":
        with normkit.use_backend("auto"):
            auto = kernels.select(x)
        cuda = kernels.status()["cuda"]
        if auto is None or auto.name != "triton" or cuda["kernels"] != "triton":
            raise CheckFailed(f"'auto' does not pick the Triton kernels for CUDA tensors: status {cuda}")
    return {"kernels_status": report, "kernel_set": chosen.name}


def definitions_check(rows: list[Row], device: torch.device) -> dict:
    """normkit's float64 reference path on the device against ``tests/reference.py``, the
    definitions written independently (run on the CPU), for every row with a source list,
    with the mix weights the layer reports (as ``tests/test_core.py`` does)."""
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        import reference as definitions
    except ImportError as exc:
        raise NotApplicable(f"tests/reference.py cannot be imported: {exc}") from exc
    finally:
        sys.path.remove(str(ROOT / "tests"))
    worst, checked = 0.0, []
    for row in rows:
        if row.kind == "ln" or not row.sources:
            continue
        c = row.channels(12)
        gen = torch.Generator().manual_seed(len(checked))
        module = _randomise(row.build(c, 2, 1), len(checked)).double().to(device).train()
        x = torch.randn(3, c, 4, 5, generator=gen, dtype=torch.float64)
        with normkit.use_backend("reference"):
            y = module(x.to(device))
        m = copy.deepcopy(module).cpu()
        weights = [getattr(m, k).tolist() if hasattr(m, k) else None for k in ("mean_weights", "var_weights")]
        want = definitions.switch_norm(x, row.sources, *weights, m.weight, m.bias, m.eps, 1)
        try:
            margins = compare({"y": y.cpu()}, {"y": want}, torch.float64)
        except CheckFailed as exc:
            raise CheckFailed(f"{row.name}: {exc}") from None
        worst = max(worst, margins["y"])
        checked.append(row.name)
    return {"rows": checked, "worst": worst}


class _SmallCNN(nn.Module):
    """Convolutions, each followed by a normkit layer (``first``: only the first of them)."""

    def __init__(self, first: Optional[int] = None):
        super().__init__()
        blocks = [
            (nn.Conv2d(3, 16, 3, padding=1), normkit.SwitchNorm2d(16)),
            (nn.Conv2d(16, 16, 3, stride=2, padding=1), normkit.SwitchNorm2d(16, sources=("in", "ln", "bn", "gn4"))),
            (nn.Conv2d(16, 16, 3, padding=1), normkit.BatchNorm2d(16)),
            (nn.Conv2d(16, 16, 3, padding=1), normkit.GroupNorm(4, 16)),
        ][:first]
        self.features = nn.Sequential(*[m for conv, norm in blocks for m in (conv, norm, nn.ReLU())])
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def autocast_check(device: torch.device, backend: str, dtype_name: str, blocks: Optional[int] = None) -> dict:
    """The small CNN (its first ``blocks``) under ``torch.autocast``: each normkit layer's
    output and input gradient against its float64 reference at the (half) input it
    received, running statistics, finite parameter gradients."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = _SmallCNN(blocks).to(device).to(memory_format=torch.channels_last).train()
    norms = [m for m in model.modules() if isinstance(m, (normkit.SwitchNorm2d, normkit.BatchNorm2d, normkit.GroupNorm))]
    before = [copy.deepcopy(m) for m in norms]
    seen: dict[int, dict] = {}

    def keep_input(i):
        def hook(module, args, output):
            seen[i] = {"x": args[0].detach(), "y": output.detach()}
        return hook

    def keep_grads(i):
        def hook(module, grad_input, grad_output):
            seen[i].update(dx=grad_input[0].detach(), dy=grad_output[0].detach())
        return hook

    handles = [h for i, m in enumerate(norms) for h in (m.register_forward_hook(keep_input(i)),
                                                        m.register_full_backward_hook(keep_grads(i)))]
    x = torch.randn(4, 3, 12, 12, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with counting_passes(backend) as calls, normkit.use_backend(backend):
            with torch.autocast(device.type, dtype=dtype):
                out = model(x)
            out.float().square().mean().backward()
    finally:
        for h in handles:
            h.remove()
    margins = {}
    for i, (m, old) in enumerate(zip(norms, before)):
        s = seen[i]
        ref = copy.deepcopy(old).double()
        xr = s["x"].double().requires_grad_()
        with normkit.use_backend("reference"):
            yr = ref(xr)
            yr.backward(s["dy"].double())
        got = {"y": s["y"], "grad x": s["dx"], **{k: b for k, b in m.named_buffers() if b is not None}}
        want = {"y": yr, "grad x": xr.grad, **{k: b for k, b in ref.named_buffers() if b is not None}}
        tol_dtype = s["x"].dtype if s["x"].dtype in TOLERANCES else dtype
        margins[f"{i}:{type(m).__name__}"] = max(compare(got, want, tol_dtype).values())
        if s["x"].dtype != dtype:
            raise CheckFailed(f"layer {i} received {s['x'].dtype} under autocast to {dtype}")
    bad = [k for k, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    if bad:
        raise CheckFailed(f"missing or non-finite gradients of {bad}")
    if not calls["apply"]:
        raise CheckFailed(f"the {backend!r} kernels did not run under autocast (pass calls {calls})")
    return {"margins": margins, "worst": max(margins.values()), "output_dtype": str(out.dtype),
            "calls": {k: v for k, v in calls.items() if v}}


def compile_check(device: torch.device, backend: str, compile_backend: str, blocks: Optional[int] = None) -> dict:
    """``torch.compile`` (one graph) of the small CNN (its first ``blocks``): two training
    steps and an eval forward against the eager float64 reference: loss, every gradient,
    running statistics."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _SmallCNN(blocks).to(device)
    twin = copy.deepcopy(model).double()
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    margins: dict[str, float] = {}
    start = time.perf_counter()
    with normkit.use_backend(backend):
        for step in range(2):
            x = torch.randn(8, 3, 16, 16, device=device)
            model.zero_grad(set_to_none=True)
            twin.zero_grad(set_to_none=True)
            loss = compiled(x).square().mean()
            loss.backward()
            with normkit.use_backend("reference"):
                want_loss = twin(x.double()).square().mean()
                want_loss.backward()
            got = {"loss": loss, **{f"grad {k}": p.grad for k, p in model.named_parameters()},
                   **{k: b for k, b in model.named_buffers() if b.is_floating_point()}}
            want = {"loss": want_loss, **{f"grad {k}": p.grad for k, p in twin.named_parameters()},
                    **{k: b for k, b in twin.named_buffers() if b.is_floating_point()}}
            margins[f"train step {step}"] = max(compare(got, want, torch.float32).values())
        model.eval()
        twin.eval()
        x = torch.randn(8, 3, 16, 16, device=device)
        with torch.no_grad():
            got_eval = compiled(x)
            with normkit.use_backend("reference"):
                want_eval = twin(x.double())
        margins["eval"] = compare({"y": got_eval}, {"y": want_eval}, torch.float32)["y"]
    return {"margins": margins, "worst": max(margins.values()), "compile_backend": compile_backend,
            "seconds_with_compile": round(time.perf_counter() - start, 1)}


def opcheck_checks(rec: Recorder, device: torch.device, dry_run: bool) -> None:
    """``torch.library.opcheck`` of normkit's operators with the samples of
    ``tests/test_operators.py``, on the device where a kernel for it is registered, and on
    the CPU (the operators' kernels) in this torch build."""
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        import test_operators as samples
    except ImportError as exc:
        rec.run("opcheck/import", lambda: _raise(NotApplicable(f"tests/test_operators.py cannot be imported: {exc}")),
                check="opcheck")
        return
    finally:
        sys.path.remove(str(ROOT / "tests"))
    names = list(samples.OP_SAMPLES)[:1] if dry_run else list(samples.OP_SAMPLES)
    # The AOT-dispatch test compiles each sample (seconds on a small CPU): the dry run runs the others.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if dry_run else None
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    for where in dict.fromkeys([device.type, "cpu"]):
        for i, name in enumerate(names):
            for fmt_name, fmt in list(formats.items())[: 1 if i or dry_run else 2]:  # channels_last: the first
                rec.run(f"opcheck/{where}/layer_forward/{name}/{fmt_name}",
                        lambda n=name, f=fmt, w=where: _opcheck_forward(samples, n, f, torch.device(w), utils),
                        check="opcheck", device=where)
        rec.run(f"opcheck/{where}/layer_backward+update_running_",
                lambda w=where: _opcheck_backward(samples, torch.device(w), utils), check="opcheck", device=where)


def _raise(exc: Exception):
    raise exc


def _to(args: tuple, device: torch.device) -> tuple:
    moved = []
    for a in args:
        if isinstance(a, Tensor):
            t = a.detach().to(device)
            moved.append(t.requires_grad_(a.requires_grad) if t.is_floating_point() else t)
        else:
            moved.append(a)
    return tuple(moved)


def _need_kernel(op: str, device: torch.device) -> None:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device.type]
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"normkit::{op}", key):
        raise NotApplicable(f"no {key} kernel is registered for normkit::{op} (on {key} the layers run the "
                            "generic path of the kernel set's passes, checked by the layer checks)")
    if device.type == "cpu" and kernels.load("cpu") is None:
        raise NotApplicable(f"the CPU kernel library is not loaded: {kernels.status()['cpu']['reason']}")


def _opcheck(op, args: tuple, utils: Optional[tuple]) -> None:
    if utils is None:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=utils)


def _opcheck_forward(samples, name: str, fmt, device: torch.device, utils: Optional[tuple]) -> dict:
    _need_kernel("layer_forward", device)
    args = _to(samples._op_args(*samples.OP_SAMPLES[name], fmt=fmt), device)
    _opcheck(torch.ops.normkit.layer_forward.default, args, utils)
    return {"test_utils": "all" if utils is None else list(utils)}


def _opcheck_backward(samples, device: torch.device, utils: Optional[tuple]) -> dict:
    _need_kernel("layer_backward", device)
    x, w, b, wm, wv, rm, rv, kinds, groups, mask, eps, axis = _to(samples._op_args([0, 1, 2], [1, 1, 1], 0), device)
    with torch.no_grad():
        y, stats = torch.ops.normkit.layer_forward(x, w, b, wm, wv, rm, rv, kinds, groups, mask, eps, axis)
    dy = torch.randn_like(y)
    for output_mask in ([True] * 5, [True, False, True, False, True]):
        _opcheck(torch.ops.normkit.layer_backward.default,
                 (dy, x.detach(), stats, w.detach(), wm.detach(), wv.detach(), None, None, kinds, groups, mask, eps,
                  axis, output_mask), utils)
    n, c = x.shape[:2]
    running = (torch.zeros(c, dtype=torch.float64, device=device), torch.ones(c, dtype=torch.float64, device=device))
    _opcheck(torch.ops.normkit.update_running_.default, (*running, stats, n, c, x.numel() // (n * c), 1, 0.1), utils)
    return {"test_utils": "all" if utils is None else list(utils)}


# --------------------------------------------------------------------------- phases


@dataclass
class Options:
    out: Path
    device: torch.device
    backend: str
    quick: bool
    dry_run: bool
    time_limit: float
    only: list[str] = field(default_factory=list)
    resume: bool = False
    compile_backend: str = "inductor"
    peak_tbs: float = bench_gpu.H200_HBM_TBS

    def wanted(self, name: str) -> bool:
        return not self.only or any(part in name for part in self.only)


def correctness_phase(opts: Options) -> int:
    env = environment(opts.device)
    env["tolerances"] = {str(k).replace("torch.", ""): v for k, v in TOLERANCES.items()}
    rec = Recorder(opts.out, "correctness", env, time.monotonic() + opts.time_limit, render_correctness,
                   opts.resume, opts.device)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32 here
    try:
        rows = table_rows()
        rec.data["rows"] = {r.name: r.source for r in rows}
        checks: list[tuple[str, Callable, dict]] = [
            ("backend", lambda: backend_check(opts.device, opts.backend), {"check": "backend"}),
            ("definitions", lambda: definitions_check(rows, opts.device), {"check": "definitions"}),
        ]
        units = layer_units(rows, opts.dry_run)
        if opts.dry_run or opts.quick:
            units = covering(units, pairs=not opts.dry_run)
        checks += [(u.name, lambda u=u: layer_check(u, opts.device, opts.backend), u.meta()) for u in units]
        blocks = 2 if opts.dry_run else None  # the interpreter is slow
        for dtype in ("bfloat16", "float16"):
            checks.append((f"autocast/{dtype}", lambda d=dtype: autocast_check(opts.device, opts.backend, d, blocks),
                           {"check": "autocast", "dtype": dtype}))
        for name, fn, meta in checks:
            if opts.wanted(name):
                rec.run(name, fn, **meta)
        if opts.wanted("opcheck"):
            opcheck_checks(rec, opts.device, opts.dry_run)
        if opts.wanted("compile"):
            blocks = 1 if opts.dry_run else None  # tracing is slow on a small CPU
            rec.run("compile/small-cnn", lambda: compile_check(opts.device, opts.backend, opts.compile_backend, blocks),
                    needs=0 if opts.dry_run else 90, check="compile")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rec.finish()
    print(render_counts(rec.records))
    write_summary(opts.out)
    return rec.exit_status()


def timing_phase(opts: Options) -> int:
    env = environment(opts.device)
    env["peak_tbs"] = opts.peak_tbs
    rec = Recorder(opts.out, "timing", env, time.monotonic() + opts.time_limit, render_timing, opts.resume, opts.device)
    timer = bench_gpu.Timer(opts.device)
    torch.backends.cudnn.benchmark = True  # the ResNet's convolutions at their best, for both norms
    plan = timing_plan(opts)
    env["plan"] = {k: v for k, v in plan.items() if k != "configs"}
    rec.data.setdefault("layers", [])
    rec.data.setdefault("resnet", [])
    rec.data.setdefault("profiles", [])

    def layer(shape, dtype, fmt):
        def measure():
            rows = bench_gpu.measure_config(shape, dtype, fmt, timer, plan["reps"], plan["warmup"])
            rec.data["layers"] = bench_gpu.derive(rec.data["layers"] + rows, opts.peak_tbs)
            return {"variants": len(rows)}
        return measure

    def resnet(norm, precision):
        def measure():
            row = bench_gpu.measure_resnet(norm, precision, plan["resnet_batch"], plan["resnet_resolution"], timer,
                                           plan["resnet_reps"], plan["resnet_warmup"], plan["resnet_width"],
                                           plan["resnet_blocks"])
            rec.data["resnet"] = bench_gpu.derive_resnet(rec.data["resnet"] + [row])
            return {"step_ms": row["step_ms"]}
        return measure

    def profile(variant, shape, dtype, fmt):
        def measure():
            p = bench_gpu.profile_layer(variant, shape, dtype, fmt, opts.device, plan["profile_steps"])
            rec.data["profiles"].append(p)
            return {"launches_per_step": p["launches_per_step"]}
        return measure

    jobs = []  # the most telling first, so a time limit cuts the least important
    for group in plan["configs"]:
        for shape, dtype, fmt in group:
            jobs.append((f"layers/{bench_gpu.shape_label(shape)}/{dtype}/{fmt}", layer(shape, dtype, fmt)))
        if group is plan["configs"][0]:
            for precision in plan["resnet_precisions"]:
                for norm in bench_gpu.RESNET_NORMS:
                    jobs.append((f"resnet50/{norm}/{precision}", resnet(norm, precision)))
            for variant, shape, dtype, fmt in plan["profiles"]:
                jobs.append((f"profile/{variant}/{bench_gpu.shape_label(shape)}/{dtype}/{fmt}",
                             profile(variant, shape, dtype, fmt)))
    with normkit.use_backend("auto"):
        for name, fn in jobs:
            if opts.wanted(name):
                rec.run(name, fn, check=name.split("/")[0])
    rec.data["goals"] = bench_gpu.goals(rec.data["layers"])
    rec.finish()
    print(render_counts(rec.records))
    write_summary(opts.out)
    return EXIT_FAILED if any(r["status"] in ("fail", "error", "crashed") for r in rec.records.values()) else (
        EXIT_INCOMPLETE if rec.stopped else 0)


def timing_plan(opts: Options) -> dict:
    """What the timing phase measures: shapes, dtypes, formats, repetitions."""
    if opts.dry_run:
        tiny = (2, 64, 4, 4)
        return {
            "configs": [[(tiny, "float32", f) for f in bench_gpu.FORMATS]], "reps": 2, "warmup": 1,
            "resnet_batch": 2, "resnet_resolution": 16, "resnet_width": 4, "resnet_blocks": (1, 1, 1, 1),
            "resnet_reps": 1, "resnet_warmup": 0, "resnet_precisions": ["float32"],
            "profile_steps": 2, "profiles": [("normkit SN", tiny, "float32", "nchw")],
        }

    def every(shapes):
        return [(s, d, f) for d in ("float32", "bfloat16") for f in bench_gpu.FORMATS for s in shapes]

    configs = [every(bench_gpu.BENCH_SHAPES)]
    if not opts.quick:
        configs += [every(bench_gpu.resnet50_shapes(32)), every(bench_gpu.resnet50_shapes(2))]
    profiled = (((32, 64, 32, 32), "float32", "nchw"), ((32, 256, 56, 56), "bfloat16", "channels_last"))
    return {
        "configs": configs, "reps": 10 if opts.quick else 25, "warmup": 3 if opts.quick else 5,
        "resnet_batch": 32, "resnet_resolution": 224, "resnet_width": 64, "resnet_blocks": (3, 4, 6, 3),
        "resnet_reps": 5 if opts.quick else 10, "resnet_warmup": 3,
        "resnet_precisions": ["bfloat16"] if opts.quick else ["float32", "bfloat16"],
        "profile_steps": 5, "profiles": [(v, *p) for v in ("normkit SN", "nn.BatchNorm2d") for p in profiled],
    }


# --------------------------------------------------------------------------- markdown


def _env_lines(env: dict) -> list[str]:
    keys = ("utc", "command", "gpu", "driver", "capability", "sm_count", "cuda_runtime", "cudnn", "torch", "triton",
            "python", "normkit", "normkit_commit", "device", "triton_interpret")
    return [f"- {k}: {env[k]}" for k in keys if env.get(k) is not None]


def render_counts(records: dict) -> str:
    counts: dict[str, int] = {}
    for r in records.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no checks"


def render_correctness(doc: dict) -> str:
    records = doc["records"]
    lines = ["# normkit GPU check: correctness", "", *_env_lines(doc["environment"]), "",
             f"Checks: {render_counts(records)}." + (f" Stopped: {doc['stopped']}." if doc.get("stopped") else ""), "",
             "Tolerances (rtol, atol): "
             + ", ".join(f"{k} {tuple(v)}" for k, v in doc["environment"].get("tolerances", {}).items())
             + "; worst = max |error| / tolerance over the outputs (y, grad x, parameter gradients, buffers).", ""]
    problems = [(n, r) for n, r in records.items() if r["status"] not in ("pass", "n/a")]
    if problems:
        lines += ["## Not passed", ""]
        lines += [f"- `{n}`: **{r['status']}**: {str(r.get('detail', '')).strip()[:1500]}" for n, r in problems]
        lines.append("")
    layers = [r for r in records.values() if r.get("check") == "layer"]
    if layers:
        lines += ["## Layers: passed / checked, per configuration and dtype", ""]
        dtypes = sorted({r["dtype"] for r in layers})
        lines += ["| configuration | " + " | ".join(dtypes) + " | worst | routes |",
                  "|---|" + "---:|" * (len(dtypes) + 1) + "---|"]
        for row in dict.fromkeys(r["row"] for r in layers):
            mine = [r for r in layers if r["row"] == row]
            cells = []
            for d in dtypes:
                of = [r for r in mine if r["dtype"] == d]
                cells.append(f"{sum(r['status'] == 'pass' for r in of)}/{len(of)}" if of else "-")
            worst = max((r.get("worst", 0.0) for r in mine if r["status"] == "pass"), default=None)
            routes = ", ".join(sorted({r.get("route", "?") for r in mine if r["status"] == "pass"}))
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {'-' if worst is None else f'{worst:.3f}'} | {routes} |")
        lines.append("")
    lines += ["## Every check", "", "| check | status | worst | route | s |", "|---|---|---:|---|---:|"]
    for n, r in records.items():
        worst = r.get("worst")
        lines.append(f"| `{n}` | {r['status']} | {'' if worst is None else f'{worst:.3f}'} | {r.get('route', '')} | "
                     f"{r.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def render_timing(doc: dict) -> str:
    data, env = doc["data"], doc["environment"]
    lines = ["# normkit GPU check: timing", "", *_env_lines(env), "",
             f"Jobs: {render_counts(doc['records'])}." + (f" Stopped: {doc['stopped']}." if doc.get("stopped") else ""),
             "", ("Times are medians of CUDA-event timings of single calls (idle GPU, L2 flushed before each), "
                  if env.get("gpu") else "Dry run on the CPU: times are medians of perf_counter timings, "
                  "a check of the script, not a measurement; ")
             + "training mode; bandwidth counts the minimum traffic (forward 2, forward+backward 5 x bytes(x)) "
             f"against the HBM peak {env.get('peak_tbs', bench_gpu.H200_HBM_TBS)} TB/s; 'moved' counts what "
             "normkit's passes move (3 and 8 x bytes(x)); parameters float32.", ""]
    if data.get("layers"):
        lines += ["## Goals", "", bench_gpu.goals_markdown(bench_gpu.goals(data["layers"])), "",
                  "## Layers", bench_gpu.layer_tables(data["layers"], env.get("peak_tbs", bench_gpu.H200_HBM_TBS)), ""]
    if data.get("resnet"):
        first = data["resnet"][0]
        lines += [f"## ResNet-50 training step (channels_last, SGD; stem width {first.get('width')}, "
                  f"bottlenecks {first.get('blocks')})", "", bench_gpu.resnet_table(data["resnet"]), ""]
    if data.get("profiles"):
        lines += ["## Profiles (torch.profiler)", ""]
        lines += [bench_gpu.profile_markdown(p) + "\n" for p in data["profiles"]]
    problems = [(n, r) for n, r in doc["records"].items() if r["status"] not in ("pass", "n/a")]
    if problems:
        lines += ["## Jobs not completed", ""] + [f"- `{n}`: {r['status']}: {str(r.get('detail', ''))[:800]}"
                                                  for n, r in problems]
    return "\n".join(lines) + "\n"


def summary_phase(opts: Options) -> int:
    """``summary.md`` from the phases' JSON (each phase also writes it when it ends); the
    exit status is the correctness verdict."""
    status, text = write_summary(opts.out)
    print(text)
    return status


def write_summary(out: Path) -> tuple[int, str]:
    """Writes ``summary.md`` from whatever phase results ``out`` holds; returns the
    correctness verdict as an exit status (2: no correctness results) and the text."""
    docs = {}
    for phase in ("correctness", "timing"):
        path = out / f"{phase}.json"
        docs[phase] = json.loads(path.read_text()) if path.exists() else None
    correctness, timing = docs["correctness"], docs["timing"]
    env = (correctness or timing or {"environment": {}})["environment"]
    lines = ["# normkit GPU check: summary", "", *_env_lines(env), ""]
    status = 2
    if correctness is None:
        lines.append("**Correctness: not run** (no correctness.json).")
    else:
        records = correctness["records"]
        bad = [n for n, r in records.items() if r["status"] not in ("pass", "n/a")]
        status = 0 if not bad else EXIT_FAILED
        verdict = "PASSED" if not bad else "NOT PASSED"
        lines.append(f"**Correctness: {verdict}** ({render_counts(records)}; details in correctness.md).")
        lines += [f"- `{n}`: {records[n]['status']}" for n in bad[:40]]
        na = [n for n, r in records.items() if r["status"] == "n/a"]
        if na:
            reasons = sorted({str(records[n]["detail"])[:160] for n in na})
            lines.append(f"- not applicable here ({len(na)}): " + "; ".join(reasons))
    lines.append("")
    if timing is None:
        lines.append("**Timing: not run** (no timing.json).")
    else:
        lines += [f"**Timing** ({render_counts(timing['records'])}; tables in timing.md).", ""]
        if timing["data"].get("layers"):
            lines += [bench_gpu.goals_markdown(bench_gpu.goals(timing["data"]["layers"])), ""]
        if timing["data"].get("resnet"):
            lines += [bench_gpu.resnet_table(timing["data"]["resnet"]), ""]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return status, text


# --------------------------------------------------------------------------- command line


def parse(argv: Optional[list[str]]) -> tuple[str, Options]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("correctness", "timing", "summary"), required=True)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_results", help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="covering subsets, the five shapes only, fewer repetitions")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, small shapes (TRITON_INTERPRET=1 for Triton)")
    parser.add_argument("--backend", default="triton", choices=kernels.BACKENDS[2:],
                        help="the kernel set the correctness phase checks (default: triton)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds; later checks are skipped")
    parser.add_argument("--only", action="append", default=[], help="run only checks whose name contains this")
    parser.add_argument("--resume", action="store_true", help="keep the finished checks of an earlier run")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; dry run: eager)")
    parser.add_argument("--peak-tbs", type=float, default=bench_gpu.H200_HBM_TBS, help="HBM peak, TB/s")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and args.phase != "summary" and not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: the {args.phase} phase needs a CUDA device, and torch.cuda.is_available() is "
                         "False; run it on a GPU machine, or pass --dry-run to run it on the CPU")
    if args.dry_run and args.backend == "triton" and args.phase == "correctness":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("gpu_check: a dry run of the Triton kernels on the CPU needs Triton's interpreter, and "
                             "TRITON_INTERPRET is not 1; set TRITON_INTERPRET=1, or pass another --backend")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    return args.phase, Options(out, device, args.backend, args.quick, args.dry_run, args.time_limit, args.only,
                               args.resume, compile_backend, args.peak_tbs)


def main(argv: Optional[list[str]] = None) -> int:
    phase, opts = parse(argv)
    # A hang (a kernel that never returns) prints every thread's stack before the shell's
    # timeout kills the process.
    faulthandler.dump_traceback_later(opts.time_limit + 10, exit=False)
    try:
        return {"correctness": correctness_phase, "timing": timing_phase, "summary": summary_phase}[phase](opts)
    finally:
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    sys.exit(main())
