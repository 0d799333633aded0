"""Checks of normkit's Triton kernels on CPU, under Triton's interpreter.

Triton decides at ``@triton.jit`` time whether a kernel is interpreted, so these checks run
in a fresh process started with ``TRITON_INTERPRET=1`` (see ``test_triton.py``), never in
the pytest process. Each check compares against float64 references written here, or (for
whole layers) against normkit's reference autograd path.

Run by hand: ``TRITON_INTERPRET=1 python tests/_triton_check.py [check names]``; it prints
one JSON line ``{name: "ok" or traceback}`` after ``RESULT_PREFIX``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
import warnings
from typing import Callable

import torch

RESULT_PREFIX = "TRITON_CHECK_RESULTS "
CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def _triton():
    from normkit.kernels import triton as _triton

    return _triton


# --------------------------------------------------------------------------- inputs and references

# (shape, channel axis, memory format): channels-first, channels-last (memory format or last
# axis), odd sizes, L = 1, 2-D, 3-D and 5-D.
LAYOUTS = [
    ((3, 5, 7, 9), 1, torch.contiguous_format),
    ((3, 5, 7, 9), 1, torch.channels_last),
    ((2, 6, 4), 2, torch.contiguous_format),
    ((2, 3, 2, 3, 5), 1, torch.channels_last_3d),
    ((5, 3), 1, torch.contiguous_format),
    ((2, 4, 1, 1), 1, torch.contiguous_format),
    ((2, 4, 1, 1), 1, torch.channels_last),
    ((1, 1, 33), 1, torch.contiguous_format),
]


def _make(shape, fmt, dtype=torch.float32, offset=0.0, scale=1.0) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    return x.to(dtype).contiguous(memory_format=fmt)


def _ncl(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(N, C, L) float64 view of t with channels at ``axis``."""
    t = t.double().movedim(axis, 1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _back(v: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    moved = like.movedim(axis, 1)
    return v.reshape(moved.shape).movedim(1, axis)


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _same_layout(y: torch.Tensor, x: torch.Tensor, what: str) -> None:
    assert y.dtype == x.dtype, f"{what}: dtype {y.dtype}, expected {x.dtype}"
    assert y.shape == x.shape and y.stride() == x.stride(), f"{what}: strides {y.stride()}, expected {x.stride()}"


# --------------------------------------------------------------------------- kernel checks


@check
def supports_and_layouts():
    T = _triton()
    assert T.INTERPRET, "normkit.kernels.triton was not imported in interpreter mode"
    for shape, axis, fmt in LAYOUTS:
        assert T.supports(_make(shape, fmt), axis) is None, (shape, axis, fmt)
    x = torch.randn(2, 3, 4, 5)
    assert T.supports(x, 2) is not None, "a middle channel axis of a contiguous tensor is not a supported layout"
    assert T.supports(x.transpose(2, 3), 1) is not None, "a non-dense permutation is not supported"
    assert T.supports(x[:, :, ::2], 1) is not None, "a strided slice is not supported"
    assert T.supports(x.to(torch.int32), 1) is not None
    assert T.supports(torch.empty(0, 3, 4), 1) is not None
    assert all(T.supports(t, 1) is None for t in (x.double(), x.half(), x.bfloat16()))


@check
def moments_match_float64():
    T = _triton()
    for shape, axis, fmt in LAYOUTS:
        for offset in (0.0, 1e4):
            for split in (None, 3):
                x = _make(shape, fmt, offset=offset)
                mean, var = T.moments(x, axis, split=split)
                v = _ncl(x, axis)
                what = f"moments {shape} axis={axis} {fmt} offset={offset} split={split}"
                assert mean.dtype == var.dtype == torch.float32 and mean.shape == v.shape[:2], what
                # float32 storage of a mean near 1e4 alone is worth 5e-4.
                _close(mean, v.mean(2), 0, 1e-6 + 1e-7 * offset, what + " mean")
                _close(var, v.var(2, correction=0), 2e-5, 1e-6, what + " var")


@check
def long_rows_split_over_programs():
    """Many positions, split over programs: the merge of partial moments keeps
    1e4 + N(0, 1), and partial sums of the backward reduction add up."""
    T = _triton()
    for fmt in (torch.contiguous_format, torch.channels_last):
        for offset, mean_tol in ((3.0, 1e-6), (1e4, 2e-3)):
            x = _make((2, 3, 50, 61), fmt, offset=offset, scale=2.0)
            v = _ncl(x, 1)
            for split in (None, 1, 2, 7):
                mean, var = T.moments(x, 1, split=split)
                what = f"{fmt} offset={offset} split={split}"
                _close(mean, v.mean(2), 0, mean_tol, f"mean {what}")
                _close(var, v.var(2, correction=0), 1e-5, 0, f"var {what}")
                dy = _make(x.shape, fmt)
                s_dy, s_dyxc = T.reduce(dy, x, mean, 1, split=split)
                d = _ncl(dy, 1)
                _close(s_dy, d.sum(2), 1e-5, 1e-4, f"sum(dy) {what}")
                _close(s_dyxc, (d * (v - mean.double()[..., None])).sum(2), 1e-5, 1e-4, f"sum(dy*(x-m)) {what}")


@check
def moments_half_and_double_inputs():
    T = _triton()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        for shape, axis, fmt in LAYOUTS[:4]:
            x = _make(shape, fmt, dtype=dtype, offset=3.0)
            mean, var = T.moments(x, axis, split=2)
            expected = torch.float64 if dtype == torch.float64 else torch.float32
            assert mean.dtype == var.dtype == expected, (dtype, mean.dtype)
            tol = 1e-12 if dtype == torch.float64 else 2e-5
            v = _ncl(x, axis)  # the rounded half values, in float64
            _close(mean, v.mean(2), tol, tol, f"{dtype} mean {shape} {fmt}")
            _close(var, v.var(2, correction=0), tol, tol, f"{dtype} var {shape} {fmt}")


def _stats(n, c, dtype=torch.float32):
    mu = torch.randn(n, c, dtype=dtype)
    scale = torch.rand(n, c, dtype=dtype) + 0.5
    return mu, scale


@check
def apply_matches_float64():
    T = _triton()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape, axis, fmt in LAYOUTS:
            x = _make(shape, fmt, dtype=dtype)
            n, c = shape[0], shape[axis]
            sdtype = torch.float64 if dtype == torch.float64 else torch.float32
            mu, scale = _stats(n, c, sdtype)
            shift = torch.randn(c, dtype=sdtype)
            # Expanded (stride-0) statistics, as the BN and LN mixers produce them.
            for m, s in ((mu, scale), (mu[:1].expand(n, c), scale[:, :1].expand(n, c))):
                y = T.apply(x, m, s, shift, axis)
                _same_layout(y, x, f"apply {dtype} {shape}")
                expected = (_ncl(x, axis) - m.double()[..., None]) * s.double()[..., None] + shift.double()[:, None]
                tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
                _close(y, _back(expected, x, axis), tol, tol, f"apply {dtype} {shape} axis={axis} {fmt}")


@check
def apply_keeps_digits_of_large_offsets():
    T = _triton()
    x = _make((2, 3, 5, 7), torch.channels_last, offset=1e4)
    v = _ncl(x, 1)
    mean, var = T.moments(x, 1)
    y = T.apply(x, mean, torch.rsqrt(var + 1e-5), torch.zeros(3), 1)
    expected = (v - v.mean(2, keepdim=True)) / torch.sqrt(v.var(2, correction=0, keepdim=True) + 1e-5)
    _close(y, _back(expected, x, 1), 0, 2e-3, "normalised 1e4 + N(0, 1)")


@check
def reduce_matches_float64():
    T = _triton()
    for dtype, layouts in ((torch.float32, LAYOUTS), (torch.bfloat16, LAYOUTS[:2]), (torch.float64, LAYOUTS[:2])):
        for shape, axis, fmt in layouts:
            x = _make(shape, fmt, dtype=dtype, offset=2.0)
            n, c = shape[0], shape[axis]
            sdtype = torch.float64 if dtype == torch.float64 else torch.float32
            mean = torch.randn(n, c, dtype=sdtype)
            # dy in x's layout, in the other layout, and a stride-0 broadcast.
            dys = [_make(shape, fmt, dtype=dtype), _make(shape, torch.contiguous_format, dtype=dtype)]
            dys.append(torch.randn((), dtype=dtype).expand(shape))
            for dy in dys:
                for split in (None, 2):
                    s_dy, s_dyxc = T.reduce(dy, x, mean, axis, split=split)
                    assert s_dy.dtype == s_dyxc.dtype == sdtype and s_dy.shape == (n, c)
                    d, v = _ncl(dy, axis), _ncl(x, axis)
                    tol = 1e-10 if dtype == torch.float64 else 1e-4
                    what = f"reduce {dtype} {shape} axis={axis} {fmt} dy strides {dy.stride()} split={split}"
                    _close(s_dy, d.sum(2), tol, tol, what + " sum(dy)")
                    _close(s_dyxc, (d * (v - mean.double()[..., None])).sum(2), tol, tol, what + " sum(dy*(x-m))")


@check
def backward_apply_matches_float64():
    T = _triton()
    for dtype, layouts in ((torch.float32, LAYOUTS), (torch.float16, LAYOUTS[:2]), (torch.float64, LAYOUTS[:2])):
        for shape, axis, fmt in layouts:
            x = _make(shape, fmt, dtype=dtype)
            n, c = shape[0], shape[axis]
            sdtype = torch.float64 if dtype == torch.float64 else torch.float32
            mean, scale = _stats(n, c, sdtype)
            p, q = torch.randn(n, c, dtype=sdtype), torch.randn(n, c, dtype=sdtype)
            for dy in (_make(shape, fmt, dtype=dtype), _make(shape, torch.contiguous_format, dtype=dtype)):
                for s in (scale, scale[:1].expand(n, c)):
                    dx = T.backward_apply(dy, x, mean, s, p, q, axis)
                    _same_layout(dx, x, f"backward_apply {dtype} {shape}")
                    e = lambda t: t.double()[..., None]  # noqa: E731
                    expected = _ncl(dy, axis) * e(s) + (_ncl(x, axis) - e(mean)) * e(q) + e(p)
                    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
                    _close(dx, _back(expected, x, axis), tol, tol, f"backward_apply {dtype} {shape} axis={axis} {fmt}")


@check
def dispatch_and_reference_switch():
    import normkit
    from normkit import kernels

    T = _triton()
    x = torch.randn(2, 4, 3, 3)
    with normkit.use_backend("triton"):
        assert kernels.select(x) is T.TRITON_KERNELS
        assert T.TRITON_KERNELS.supports(x, 2) is not None, "unsupported layouts fall back to the reference"
        assert not T.TRITON_KERNELS.runs_layer(normkit.functional.MixSpec(("bn",), 1e-5)), "generic path only"
    with normkit.use_backend("reference"):
        assert kernels.select(x) is None
    with normkit.use_backend("auto"):  # auto picks Triton for CUDA tensors only
        assert kernels.select(x) is not T.TRITON_KERNELS


# --------------------------------------------------------------------------- whole layers vs the reference path


def _layers():
    """(name, constructor from the input shape, input rank)."""
    import normkit

    return [
        ("SN in,ln,bn", lambda s: normkit.SwitchNorm2d(s[1]), 4),
        ("SN in,ln,bn,gn2", lambda s: normkit.SwitchNorm2d(s[1], sources=("in", "ln", "bn", "gn2")), 4),
        ("SN gn2,ln", lambda s: normkit.SwitchNorm2d(s[1], sources=("gn2", "ln")), 4),
        ("SN bn only", lambda s: normkit.SwitchNorm2d(s[1], sources=("bn",)), 4),
        ("SN1d (N,C,L)", lambda s: normkit.SwitchNorm1d(s[1], sources=("in", "ln", "bn", "gn2")), 3),
        ("SN1d (N,C)", lambda s: normkit.SwitchNorm1d(s[1], sources=("ln", "bn")), 2),
        ("BN2d", lambda s: normkit.BatchNorm2d(s[1]), 4),
        ("BN1d (N,C)", lambda s: normkit.BatchNorm1d(s[1]), 2),
        ("GN", lambda s: normkit.GroupNorm(2, s[1]), 4),
        ("IN2d tracked", lambda s: normkit.InstanceNorm2d(s[1], affine=True, track_running_stats=True), 4),
        ("LN", lambda s: normkit.LayerNorm(s[1:]), 3),
    ]


class _CountLaunches:
    """Counts launches of normkit.kernels.triton's kernels (proof that the Triton path ran)."""

    NAMES = ("_moments_kernel", "_apply_kernel", "_reduce_kernel", "_backward_apply_kernel")

    def __init__(self):
        self.calls = dict.fromkeys(self.NAMES, 0)

    def __enter__(self):
        T = _triton()
        self.saved = {name: getattr(T, name) for name in self.NAMES}
        for name, kernel in self.saved.items():
            setattr(T, name, _Counted(kernel, self.calls, name))
        return self

    def __exit__(self, *exc):
        T = _triton()
        for name, kernel in self.saved.items():
            setattr(T, name, kernel)


class _Counted:
    def __init__(self, kernel, calls, name):
        self.kernel, self.calls, self.name = kernel, calls, name

    def __getitem__(self, grid):
        self.calls[self.name] += 1
        return self.kernel[grid]


def _randomise(m: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "logits" in name else 0.3) + (1.0 if name == "weight" else 0.0))
    return m


def _run(module, x, dy, backend, train):
    """Output, gradients of input and parameters, and buffers after two steps of a copy of
    ``module`` (in x's dtype)."""
    import normkit

    m = copy.deepcopy(module).to(x.dtype).train(train)
    with normkit.use_backend(backend):
        for _ in range(2):  # two steps: the second reads updated running statistics in eval
            xi = x.detach().clone().requires_grad_()
            y = m(xi)
        (y * dy).sum().backward()
    grads = {f"grad {k}": p.grad for k, p in m.named_parameters() if p.grad is not None}
    buffers = {k: b for k, b in m.named_buffers() if b is not None and b.is_floating_point()}
    return {k: v.detach() for k, v in {"y": y, "grad x": xi.grad, **grads, **buffers}.items()}


def _compare_layers(dtype, formats, offset=0.0, only=None):
    """Triton vs the reference path, or, with a large offset (ill-conditioned in float32 on
    both paths), both vs float64: Triton's error must stay within four times the reference's
    (the reference mixes the sources in float64, so its own error is small)."""
    tol = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-10)}.get(dtype, (2e-2, 2e-2))
    shapes = {4: (3, 4, 5, 3), 3: (3, 4, 7), 2: (5, 4)}
    for name, make, rank in _layers():
        if only is not None and name not in only:
            continue
        for fmt in formats:
            if rank != 4 and fmt != torch.contiguous_format:
                continue
            x = _make(shapes[rank], fmt, dtype=dtype, offset=offset)
            dy = _make(shapes[rank], torch.contiguous_format, dtype=dtype)  # dy in the other layout too
            module = _randomise(make(x.shape))
            for train in (True, False):
                what = f"{name} {dtype} {fmt} {'train' if train else 'eval'} offset={offset}"
                with _CountLaunches() as launches:
                    got = _run(module, x, dy, "triton", train)
                assert launches.calls["_apply_kernel"] == 2 and launches.calls["_backward_apply_kernel"] == 1, (
                    f"{what}: the Triton path did not run ({launches.calls})"
                )
                if fmt is not torch.contiguous_format:
                    assert got["y"].is_contiguous(memory_format=fmt), f"{what}: output lost the memory format"
                want = _run(module, x, dy, "reference", train)
                assert got.keys() == want.keys(), (what, got.keys(), want.keys())
                truth = _run(module, x.double(), dy.double(), "reference", train) if offset else None
                for key in want:
                    scale = max(1.0, float(want[key].double().abs().max()))
                    if truth is None:
                        _close(got[key], want[key], tol[0], tol[1] * scale, f"{what}: {key}")
                    else:
                        bound = 4 * float((want[key].double() - truth[key]).abs().max()) + 1e-6 * scale
                        _close(got[key], truth[key], 0, bound, f"{what}: {key} vs float64")


_MAIN_LAYERS = ("SN in,ln,bn,gn2", "BN2d", "GN", "IN2d tracked")


@check
def layers_float32_match_reference():
    _compare_layers(torch.float32, (torch.contiguous_format, torch.channels_last))


@check
def layers_float32_large_offset_match_reference():
    _compare_layers(torch.float32, (torch.channels_last,), offset=1e3, only=_MAIN_LAYERS)


@check
def layers_float64_match_reference():
    _compare_layers(torch.float64, (torch.contiguous_format, torch.channels_last), only=_MAIN_LAYERS)


@check
def layers_half_match_reference():
    _compare_layers(torch.bfloat16, (torch.channels_last,), only=_MAIN_LAYERS)
    _compare_layers(torch.float16, (torch.contiguous_format,), only=_MAIN_LAYERS)


@check
def switchnorm_gradcheck_through_triton():
    """Float64 finite differences of every input of SN (x, gamma, beta, both logits)."""
    import normkit
    from normkit import functional as F

    sources = ("in", "ln", "bn", "gn2")
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = _make((3, 4, 2, 3), fmt, dtype=torch.float64).requires_grad_()
        params = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        logits = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]

        def f(x, w, b, lm, lv):
            return F.switch_norm(x, None, None, w, b, lm, lv, sources, training=True)

        with normkit.use_backend("triton"), _CountLaunches() as launches:
            assert torch.autograd.gradcheck(f, (x, *params, *logits), eps=1e-6, atol=1e-6, fast_mode=True)
        assert launches.calls["_backward_apply_kernel"] > 0, launches.calls


# --------------------------------------------------------------------------- entry point


def main(names: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1: the checks run the kernels on CPU in Triton's interpreter", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results = {}
    for name in names or list(CHECKS):
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # as pytest's filterwarnings = error
                torch.manual_seed(0)
                CHECKS[name]()
            results[name] = "ok"
        except Exception:  # reported to the parent test, which fails with this text
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(RESULT_PREFIX + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
