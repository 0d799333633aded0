"""Fused execution of a normalization: two full-size passes forward, two backward.

Any normkit normalization is ``y = (x - mu) * scale + shift`` where ``mu`` and ``scale``
are (N, C) functions of the per-(n, c) moments of ``x`` (see :class:`normkit.functional.Mixer`).
Differentiating through the moments gives, with ``m = mean_in[n, c]`` and ``L`` positions::

    dx = scale * dy + p[n, c] + q[n, c] * (x - m),   p = dL/dm / L,  q = 2 dL/dvar_in / L

and dL/dm, dL/dvar_in come from autograd on the small graph, fed with the two per-(n, c)
reductions ``sum(dy)`` and ``sum(dy * (x - m))``. So one :class:`KernelSet` of four
full-size loops serves BN, GN, LN, IN and every SN mix, without saving any full-size
temporary besides x itself.

Kernel sets: ``aten`` (composed torch ops, any device), ``cpu`` (C/OpenMP, compiled on
first use, see :mod:`normkit._cpu`), ``triton`` (CUDA, see :mod:`normkit._triton`). Under
``torch.compile``/``torch.export`` the reference path runs instead and Inductor fuses it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from normkit.functional import Moments, Mixer, moments, sum_positions, apply_affine, expand_stat, reduce_dims, stat_dtype

__all__ = ["KernelSet", "set_backend", "get_backend", "use_backend", "BACKENDS"]

BACKENDS = ("auto", "reference", "aten", "cpu", "triton")
_backend = os.environ.get("NORMKIT_BACKEND", "auto")


class KernelSet(NamedTuple):
    """The four full-size loops; all statistics are (N, C) in the statistics dtype.

    * ``moments(x, axis) -> (mean, var)``: per-(n, c) mean and biased variance.
    * ``apply(x, mu, scale, shift, axis) -> y``: ``(x - mu) * scale + shift`` in x's dtype.
    * ``reduce(dy, x, mean, axis) -> (sum_dy, sum_dy_xc)``: sums of ``dy`` and
      ``dy * (x - mean)`` over each (n, c).
    * ``backward_apply(dy, x, mean, scale, p, q, axis) -> dx``:
      ``dy * scale + (x - mean) * q + p`` in x's dtype.
    * ``supports(x, axis) -> bool``: whether this set handles this input.
    * ``fused(x, axis, mixer, small, momentum) -> (y, tracked) or None`` (optional): the
      whole layer, mixer and running-statistics update included, for sets that implement
      the O(N*C) part natively (the Python mixer graph costs ~0.5 ms per step, more than
      the passes on small tensors); ``tracked`` is None when the running statistics were
      updated in place; None means "use the generic path with the four loops above".

    ``axis`` is the non-negative channel axis; x is contiguous or channels_last.
    """

    name: str
    supports: Callable[[Tensor, int], bool]
    moments: Callable[..., tuple[Tensor, Tensor]]
    apply: Callable[..., Tensor]
    reduce: Callable[..., tuple[Tensor, Tensor]]
    backward_apply: Callable[..., Tensor]
    fused: Optional[Callable[..., Optional[tuple]]] = None


def _aten_moments(x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    m = moments(x, axis)
    return m.mean, m.var


def _aten_reduce(dy: Tensor, x: Tensor, mean: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    dims = reduce_dims(x.dim(), axis)
    n, c = mean.shape
    dys = dy.to(mean.dtype)
    centred = x.to(mean.dtype) - expand_stat(mean, x.dim(), axis)
    return sum_positions(dys, dims).reshape(n, c), sum_positions(dys * centred, dims).reshape(n, c)


def _aten_backward_apply(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, p: Tensor, q: Tensor, axis: int) -> Tensor:
    nd = x.dim()
    dx = dy.to(mean.dtype) * expand_stat(scale, nd, axis)
    dx = dx + (x.to(mean.dtype) - expand_stat(mean, nd, axis)) * expand_stat(q, nd, axis)
    return (dx + expand_stat(p, nd, axis)).to(x.dtype)


ATEN_KERNELS = KernelSet(
    "aten",
    lambda x, axis: True,
    _aten_moments,
    apply_affine,
    _aten_reduce,
    _aten_backward_apply,
)


_loaded: dict[str, Optional[KernelSet]] = {}


def _load(name: str) -> Optional[KernelSet]:
    """Import an optional kernel set once; None when its toolchain is missing (remembered,
    so that a failed build is not retried on every call; ``_loaded.clear()`` retries)."""
    if name not in _loaded:
        _loaded[name] = _import_kernels(name)
    return _loaded[name]


def _import_kernels(name: str) -> Optional[KernelSet]:
    try:
        if name == "cpu":
            from normkit._cpu import CPU_KERNELS

            return CPU_KERNELS
        if name == "triton":
            from normkit._triton import TRITON_KERNELS

            return TRITON_KERNELS
    except (ImportError, OSError, RuntimeError):
        return None
    return ATEN_KERNELS if name == "aten" else None


def set_backend(name: str) -> None:
    """Choose the kernels for the full-size passes.

    ``'auto'`` (default): Triton for CUDA tensors when installed, the compiled C kernels
    on CPU when a C compiler is found, else the reference path. ``'reference'``: the plain
    autograd path (what the tests compare against). ``'aten'``, ``'cpu'``, ``'triton'``:
    force one kernel set (an error if it cannot load). The environment variable
    ``NORMKIT_BACKEND`` sets the initial value.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name not in ("auto", "reference") and _load(name) is None:
        raise RuntimeError(f"the {name!r} kernels are not available on this machine")
    global _backend
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing()


def select_kernels(x: Tensor, channel_axis: int, mask: Optional[Tensor]) -> Optional[KernelSet]:
    """The kernel set for this call, or None for the reference path."""
    if _backend == "reference" or mask is not None or _is_tracing() or x.numel() == 0:
        return None
    if _backend == "auto":
        candidates = ("triton",) if x.is_cuda else ("cpu",) if x.device.type == "cpu" else ()
    else:
        candidates = (_backend,)
    for name in candidates:
        kernels = _load(name)
        if kernels is not None and kernels.supports(x, channel_axis):
            return kernels
    return None


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernels, axis, mixer, tracked_out, *small):  # type: ignore[override]
        n, c = x.shape[0], x.shape[axis]
        length = x.numel() // max(n * c, 1)
        dtype = stat_dtype(x.dtype)
        if mixer.needs_input_moments:
            mean, var = kernels.moments(x, axis)
        else:
            mean = var = torch.zeros(n, c, dtype=dtype, device=x.device)
        count = torch.full((n, 1), float(length), dtype=dtype, device=x.device)
        mu, scale, shift, tracked = mixer(Moments(count, mean, var), *small)
        tracked_out.append(tracked)
        y = kernels.apply(x, mu, scale, shift, axis)
        ctx.kernels, ctx.axis, ctx.mixer, ctx.length = kernels, axis, mixer, length
        ctx.small_is_none = [s is None for s in small]
        ctx.save_for_backward(x, mean, var, count, *[s for s in small if s is not None])
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, mean, var, count, *present = ctx.saved_tensors
        it = iter(present)
        small = [None if none else next(it) for none in ctx.small_is_none]
        wants = ctx.needs_input_grad[5:]
        with torch.enable_grad():
            mean_leaf = mean.detach().requires_grad_()
            var_leaf = var.detach().requires_grad_()
            leaves = [
                s.detach().requires_grad_() if (s is not None and want) else s for s, want in zip(small, wants)
            ]
            mu, scale, shift, _ = ctx.mixer(Moments(count, mean_leaf, var_leaf), *leaves)
        dy = dy.contiguous() if not (dy.is_contiguous() or dy.is_contiguous(memory_format=torch.channels_last)) else dy
        sum_dy, sum_dy_xc = ctx.kernels.reduce(dy, x, mean, ctx.axis)
        mu_d, scale_d = mu.detach(), scale.detach()
        grad_outputs = {
            "mu": -scale_d * sum_dy,
            "scale": sum_dy_xc + sum_dy * (mean - mu_d),
            "shift": sum_dy.sum(0),
        }
        outs, gouts = [], []
        for name, t in (("mu", mu), ("scale", scale), ("shift", shift)):
            if t.requires_grad:
                outs.append(t)
                gouts.append(grad_outputs[name])
        inputs = [mean_leaf, var_leaf] + [leaf for leaf, want in zip(leaves, wants) if leaf is not None and want]
        grads = list(torch.autograd.grad(outs, inputs, gouts, allow_unused=True)) if outs else [None] * len(inputs)
        g_mean, g_var = grads[0], grads[1]
        small_grads = iter(grads[2:])
        dsmall = [next(small_grads) if (s is not None and want) else None for s, want in zip(small, wants)]
        dx = None
        if ctx.needs_input_grad[0]:
            zeros = torch.zeros_like(mean)
            p = g_mean / ctx.length if g_mean is not None else zeros
            q = 2.0 * g_var / ctx.length if g_var is not None else zeros
            dx = ctx.kernels.backward_apply(dy, x, mean, scale_d, p, q, ctx.axis)
        return (dx, None, None, None, None, *dsmall)


def fused_normalize(
    kernels: KernelSet, x: Tensor, channel_axis: int, mixer: Mixer, small: tuple, momentum: float = 0.1
) -> tuple[Tensor, Optional[Moments]]:
    """``(y, tracked)``; tracked is None when the kernels already updated the running stats."""
    if kernels.fused is not None:
        done = kernels.fused(x, channel_axis, mixer, small, momentum)
        if done is not None:
            return done
    tracked: list = []
    if mixer.use_batch_stats:  # running stats are not read, and are updated in place later
        small = small[:4] + (None, None)
    y = _FusedNorm.apply(x, kernels, channel_axis, mixer, tracked, *small)
    return y, tracked[0]
