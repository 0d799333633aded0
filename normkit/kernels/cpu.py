"""The compiled CPU kernels (``csrc/norm_kernels.c``, C11 + OpenMP, built at install time)
as a kernel set: the four passes and the whole layer with the C mixer.

The library is loaded only after :func:`normkit.kernels._library.load_cpu_library` has
verified it (owner, mode, content hash). Nothing here is called with a tensor that the
operators of :mod:`normkit.kernels.ops` (or :func:`check_pass_input` for the passes) have
not validated: every pointer handed to C comes from a tensor whose shape, dtype, device,
layout and contiguity were checked against what the C function reads and writes.
ctypes releases the GIL during each call; OpenMP threads follow ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from normkit._core import stat_dtype
from normkit.kernels._library import load_cpu_library
from normkit.kernels._protocol import KernelSet

__all__ = ["CPU_KERNELS", "DTYPES", "layout_of", "check_pass_input", "layer_forward", "layer_backward"]

_lib = load_cpu_library()
_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
if _lib.nk_has_half():
    _SUFFIX[torch.float16] = "f16"
DTYPES = tuple(_SUFFIX)
MAX_SOURCES = 16


def _bind(name: str, restype, argtypes):
    fn = getattr(_lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


class _Fns:
    def __init__(self, sfx: str) -> None:
        self.moments = _bind(f"nk_moments_{sfx}", _INT, [_INT, _P, _I64, _I64, _I64, _P, _P, _INT])
        self.apply = _bind(f"nk_apply_{sfx}", None, [_INT, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT])
        self.reduce = _bind(f"nk_reduce_{sfx}", _INT, [_INT, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT])
        self.backward_apply = _bind(
            f"nk_backward_apply_{sfx}", None, [_INT, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _INT]
        )
        # the masked passes: the mask pointer follows x (moments also writes the counts)
        self.moments_masked = _bind(f"nk_moments_masked_{sfx}", _INT,
                                    [_INT, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT])
        self.apply_masked = _bind(f"nk_apply_masked_{sfx}", _INT,
                                  [_INT, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT])
        self.reduce_masked = _bind(f"nk_reduce_masked_{sfx}", _INT,
                                   [_INT, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT])
        self.backward_apply_masked = _bind(
            f"nk_backward_apply_masked_{sfx}", _INT, [_INT, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _INT]
        )
        self.layer_forward = _bind(
            f"nk_layer_forward_{sfx}", _INT,
            [_INT, _P, _P, _I64, _I64, _I64, _INT, _P, _P, _INT, _INT, _INT] + [_P] * 7 + [_DBL, _P, _INT],
        )
        # the masked layer: the mask pointer follows x; the forward also writes the valid total
        self.layer_forward_masked = _bind(
            f"nk_layer_forward_masked_{sfx}", _INT,
            [_INT, _P, _P, _P, _I64, _I64, _I64, _INT, _P, _P, _INT, _INT] + [_P] * 7 + [_DBL, _P, _P, _INT],
        )
        self.layer_backward_masked = _bind(
            f"nk_layer_backward_masked_{sfx}", _INT,
            [_INT, _P, _P, _P, _P, _I64, _I64, _I64, _INT, _P, _P, _INT, _INT] + [_P] * 6 + [_DBL, _INT]
            + [_P] * 4 + [_INT],
        )
        self.layer_backward = _bind(
            f"nk_layer_backward_{sfx}", _INT,
            [_INT, _P, _P, _P, _I64, _I64, _I64, _INT, _P, _P, _INT, _INT] + [_P] * 6 + [_DBL, _INT] + [_P] * 4
            + [_INT],
        )


_FNS = {dtype: _Fns(sfx) for dtype, sfx in _SUFFIX.items()}
_UPDATE = {
    dtype: _bind(f"nk_update_running_{sfx}", None, [_I64, _I64, _I64, _INT, _P, _P, _DBL, _P, _P])
    for dtype, sfx in ((torch.float32, "f32"), (torch.float64, "f64"))
}
_UPDATE_RENORM = {
    dtype: _bind(f"nk_update_renorm_{sfx}", None, [_I64, _I64, _P, _P, _DBL, _DBL, _P, _P])
    for dtype, sfx in ((torch.float32, "f32"), (torch.float64, "f64"))
}


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(code: int, what: str) -> None:
    if code != 0:
        raise MemoryError(f"normkit CPU kernel {what} failed (code {code}): out of memory for its workspace")


# ---- layouts -----------------------------------------------------------------------------

def layout_of(x: Tensor, axis: int) -> Optional[tuple[int, int, int, int]]:
    """``(nlc, N, C, L)`` when x is (N, C, L) (nlc=0) or (N, L, C) (nlc=1) in memory, else None."""
    ndim = x.dim()
    if ndim < 2 or axis <= 0 or axis >= ndim:
        return None
    n, c = x.shape[0], x.shape[axis]
    length = x.numel() // (n * c) if n * c else 0
    if axis == 1 and x.is_contiguous():
        return 0, n, c, length
    if x.movedim(axis, -1).is_contiguous():
        return 1, n, c, length
    if x.movedim(axis, 1).is_contiguous():
        return 0, n, c, length
    return None


def matching(t: Tensor, like: Tensor, nlc: int, axis: int) -> Tensor:
    """t with like's dtype and (N, C, L) / (N, L, C) memory layout (copied only if needed)."""
    if t.dtype == like.dtype and (t.movedim(axis, -1) if nlc else t.movedim(axis, 1)).is_contiguous():
        return t
    out = torch.empty_like(like)
    out.copy_(t)
    return out


def storage_covers(t: Tensor, elements: int) -> bool:
    """The quick form of :func:`memory_refusal` for a contiguous tensor of ``elements``
    elements: no negation bit, and its storage reaches its last element."""
    return not t.is_neg() and t.untyped_storage().nbytes() >= (t.storage_offset() + elements) * t.element_size()


def memory_refusal(t: Tensor) -> Optional[str]:
    """Why the C code must not read or write t's memory, or None: its storage is shorter than
    its data (freed with ``resize_(0)``, as FSDP does), or it carries a lazy negation bit that
    C would not see. For a strided tensor with elements."""
    if t.is_neg():
        return "it carries a lazy negation bit (call .resolve_neg() first)"
    if t.is_contiguous():
        need = (t.storage_offset() + t.numel()) * t.element_size()
    else:  # the last element's offset (strides may be 0: an expanded dy)
        need = (t.storage_offset() + 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) \
            * t.element_size()
    have = t.untyped_storage().nbytes()
    if have < need:
        return f"its storage holds {have} bytes, fewer than the {need} its data reaches (freed or resized storage)"
    return None


def _refusal(x: Tensor) -> Optional[str]:
    """Why the C kernels cannot take x whatever its layout, or None."""
    if not x.is_cpu:
        return f"the C kernels run on CPU tensors, got a {x.device.type} tensor"
    if x.dtype not in _FNS:
        return f"dtype {x.dtype} is not one of {DTYPES}"
    if x.layout != torch.strided:
        return f"layout {x.layout} is not strided"
    if x.numel() == 0:
        return "empty input"
    return None


def _layout_refusal(x: Tensor) -> str:
    return f"memory layout with strides {x.stride()} is neither channels-first nor channels-last"


def _supports(x: Tensor, axis: int) -> Optional[str]:
    reason = _refusal(x)
    if reason is None and layout_of(x, axis) is None:
        reason = _layout_refusal(x)
    # compile traces no tensor flags (and functionalization resolves them); eager may meet one
    if reason is None and not torch.compiler.is_compiling() and x.is_neg():
        reason = "x carries a lazy negation bit"
    return reason


def _stat(t: Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """A statistics tensor the C code reads or writes: exact shape, dtype, CPU, contiguous."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape or t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or t.layout != torch.strided:
        raise ValueError(
            f"{name} must be a contiguous CPU {dtype} tensor of shape {shape}, got a "
            f"{'contiguous' if t.is_contiguous() else 'non-contiguous'} {t.device.type} {t.dtype} tensor "
            f"of shape {tuple(t.shape)}"
        )
    if not storage_covers(t, math.prod(shape)):
        raise ValueError(f"{name} cannot reach the C kernels: {memory_refusal(t)}")


def check_pass_input(x: Tensor, axis: int) -> tuple[int, int, int, int]:
    """Validate x for the C passes and return its layout."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(axis, int) or not 0 < axis < max(x.dim(), 1):
        raise ValueError(f"axis must be a channel axis in [1, {x.dim() - 1}], got {axis!r}")
    reason = _refusal(x)
    layout = layout_of(x, axis) if reason is None else None
    if reason is None and layout is None:
        reason = _layout_refusal(x)
    if reason is None:
        reason = memory_refusal(x)
    if reason is not None:
        raise ValueError(f"the normkit CPU kernels cannot take this input: {reason}")
    return layout  # type: ignore[return-value]


def _like_x(t: Tensor, x: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or t.shape != x.shape or t.layout != torch.strided \
            or not (t.is_cpu and x.is_cpu or t.device == x.device):
        got = f"shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a strided tensor of x's shape {tuple(x.shape)} on {x.device}, got {got}")
    reason = memory_refusal(t)
    if reason is not None:
        raise ValueError(f"{name} cannot reach the C kernels: {reason}")


# ---- the four passes (the generic fused path) ----------------------------------------------

def _mask_arg(mask: Tensor, n: int, length: int) -> Tensor:
    """The validity mask the masked C passes read: N * L bytes (uint8, contiguous, CPU)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.uint8 or not mask.is_cpu or mask.layout != torch.strided or not mask.is_contiguous() \
            or mask.numel() != n * length:
        raise ValueError(
            f"mask must be a contiguous CPU torch.uint8 tensor of {n} * {length} = {n * length} elements "
            f"(the input's shape without its channel axis), got a "
            f"{'contiguous' if mask.is_contiguous() else 'non-contiguous'} {mask.device.type} {mask.dtype} tensor "
            f"of shape {tuple(mask.shape)}"
        )
    return mask


def _per_row(t: Tensor, name: str, n: int, c: int, dtype: torch.dtype) -> Tensor:
    """An (N, C) statistic (or one that broadcasts to it) as the contiguous CPU buffer C reads."""
    if not isinstance(t, Tensor) or t.device.type != "cpu" or t.layout != torch.strided or not t.is_floating_point():
        got = f"a {t.device.type} {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point CPU tensor that broadcasts to ({n}, {c}), got {got}")
    try:
        return t.to(dtype).expand(n, c).contiguous()
    except RuntimeError:
        raise ValueError(f"{name} must broadcast to ({n}, {c}), got shape {tuple(t.shape)}") from None


def _moments(x: Tensor, axis: int, mask: Optional[Tensor] = None):
    nlc, n, c, length = check_pass_input(x, axis)
    if mask is not None:  # (mean, var, count (N, 1)) over the valid positions
        mask = _mask_arg(mask, n, length)
        stats = torch.empty(2 * n * c + n, dtype=stat_dtype(x.dtype))
        mean, var, count = stats[:n * c].view(n, c), stats[n * c:2 * n * c].view(n, c), stats[2 * n * c:].view(n, 1)
        _check(_FNS[x.dtype].moments_masked(nlc, x.data_ptr(), mask.data_ptr(), n, c, length, count.data_ptr(),
                                            mean.data_ptr(), var.data_ptr(), torch.get_num_threads()), "moments")
        return mean, var, count
    stats = torch.empty(2, n, c, dtype=stat_dtype(x.dtype))
    _check(_FNS[x.dtype].moments(nlc, x.data_ptr(), n, c, length, stats[0].data_ptr(), stats[1].data_ptr(),
                                 torch.get_num_threads()), "moments")
    return stats[0], stats[1]


def _apply(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor, axis: int, mask: Optional[Tensor] = None) -> Tensor:
    nlc, n, c, length = check_pass_input(x, axis)
    dtype = stat_dtype(x.dtype)
    mu, scale = _per_row(mu, "mu", n, c, dtype), _per_row(scale, "scale", n, c, dtype)
    shift = shift.to(dtype).contiguous() if isinstance(shift, Tensor) else shift
    _stat(shift, "shift", (c,), dtype)
    y = torch.empty_like(x)
    if mask is not None:
        mask = _mask_arg(mask, n, length)
        _check(_FNS[x.dtype].apply_masked(nlc, x.data_ptr(), mask.data_ptr(), y.data_ptr(), n, c, length,
                                          mu.data_ptr(), scale.data_ptr(), shift.data_ptr(), torch.get_num_threads()),
               "apply")
        return y
    _FNS[x.dtype].apply(nlc, x.data_ptr(), y.data_ptr(), n, c, length, mu.data_ptr(), scale.data_ptr(),
                        shift.data_ptr(), torch.get_num_threads())
    return y


def _reduce(dy: Tensor, x: Tensor, mean: Tensor, axis: int, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    nlc, n, c, length = check_pass_input(x, axis)
    _like_x(dy, x, "dy")
    dy = matching(dy, x, nlc, axis)
    mean = _per_row(mean, "mean", n, c, stat_dtype(x.dtype))
    sums = torch.empty(2, n, c, dtype=mean.dtype)
    if mask is not None:
        mask = _mask_arg(mask, n, length)
        _check(_FNS[x.dtype].reduce_masked(nlc, dy.data_ptr(), x.data_ptr(), mask.data_ptr(), n, c, length,
                                           mean.data_ptr(), sums[0].data_ptr(), sums[1].data_ptr(),
                                           torch.get_num_threads()), "reduce")
        return sums[0], sums[1]
    _check(_FNS[x.dtype].reduce(nlc, dy.data_ptr(), x.data_ptr(), n, c, length, mean.data_ptr(),
                                sums[0].data_ptr(), sums[1].data_ptr(), torch.get_num_threads()), "reduce")
    return sums[0], sums[1]


def _backward_apply(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, p: Tensor, q: Tensor, axis: int,
                    mask: Optional[Tensor] = None) -> Tensor:
    nlc, n, c, length = check_pass_input(x, axis)
    _like_x(dy, x, "dy")
    dy = matching(dy, x, nlc, axis)
    dtype = stat_dtype(x.dtype)
    mean, scale, p, q = (_per_row(t, name, n, c, dtype) for t, name in ((mean, "mean"), (scale, "scale"), (p, "p"),
                                                                        (q, "q")))
    dx = torch.empty_like(x)
    if mask is not None:
        mask = _mask_arg(mask, n, length)
        _check(_FNS[x.dtype].backward_apply_masked(nlc, dy.data_ptr(), x.data_ptr(), mask.data_ptr(), dx.data_ptr(),
                                                   n, c, length, mean.data_ptr(), scale.data_ptr(), p.data_ptr(),
                                                   q.data_ptr(), torch.get_num_threads()), "backward")
        return dx
    _FNS[x.dtype].backward_apply(nlc, dy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, length, mean.data_ptr(),
                                 scale.data_ptr(), p.data_ptr(), q.data_ptr(), torch.get_num_threads())
    return dx


# ---- the whole layer (called by the validated operators) ----------------------------------

class _Plan(NamedTuple):
    """What the C layer calls need to know about a spec's codes, computed once per spec:
    on small inputs building these costs more than the kernel itself."""

    kinds: object  # ctypes int array
    groups: object  # ctypes int64 array
    k: int
    need_moments: int  # 0 when every statistic comes from the running averages
    renorm: object  # ctypes double[2] (r_max, d_max) of Batch Renorm, or None


_PLANS: dict[tuple, _Plan] = {}


def _plan(kinds, groups, constant_mask: int, renorm=None) -> _Plan:
    key = (tuple(kinds), tuple(groups), constant_mask, tuple(renorm) if renorm else None)
    plan = _PLANS.get(key)
    if plan is None:
        k = len(kinds)
        plan = _Plan((ctypes.c_int * k)(*kinds), (ctypes.c_int64 * k)(*groups), k,
                     int(constant_mask != (1 << k) - 1), (ctypes.c_double * 2)(*renorm) if renorm else None)
        if len(_PLANS) < 4096:
            _PLANS[key] = plan
    return plan


def stats_size(n: int, c: int, renorm: bool = False) -> int:
    """Entries of the statistics buffer: mean, var, mu, scale (N*C each); shift, batch
    mean, batch var (C each); with Batch Renorm its r and d (C each)."""
    return 4 * n * c + (5 if renorm else 3) * c


def layer_forward(x, weight, bias, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                  constant_mask, eps, axis, renorm=None, softmax=False, layout=None):
    """One C call: moments, mix, apply (``layout``: x's, when the caller has it; ``renorm``:
    Batch Renorm's ``(r_max, d_max)``, which reads ``running_mean`` and ``running_var``;
    ``softmax``: ``mean_weights`` and ``var_weights`` are logits of the statistics dtype,
    mixed with their softmax)."""
    nlc, n, c, length = layout or layout_of(x, axis)  # type: ignore[misc]
    plan = _plan(kinds, groups, constant_mask, renorm)
    stats = torch.empty(stats_size(n, c, bool(renorm)), dtype=stat_dtype(x.dtype))
    y = torch.empty_like(x)
    _check(_FNS[x.dtype].layer_forward(
        nlc, x.data_ptr(), y.data_ptr(), n, c, length, plan.k, plan.kinds, plan.groups, constant_mask,
        int(softmax), plan.need_moments, stats.data_ptr(), _ptr(mean_weights), _ptr(var_weights), _ptr(running_mean),
        _ptr(running_var), _ptr(weight), _ptr(bias), eps, plan.renorm, torch.get_num_threads()), "forward")
    return y, stats


def masked_stats_size(n: int, c: int, renorm: bool = False) -> int:
    """Entries of a masked layer's statistics buffer: :func:`stats_size`'s, then the
    per-sample valid counts (N)."""
    return stats_size(n, c, renorm) + n


def layer_forward_masked(x, mask8, weight, bias, mean_weights, var_weights, running_mean, running_var, kinds,
                         groups, constant_mask, eps, axis, renorm=None, softmax=False):
    """One C call for a masked layer: masked moments, the mixer over the per-sample valid
    counts, masked apply. ``mask8``: the contiguous uint8 (N, L) validity mask. Returns ``(y,
    stats, valid total)``; every argument was validated by the caller, ``mask8`` here."""
    nlc, n, c, length = layout_of(x, axis)  # type: ignore[misc]
    mask8 = _mask_arg(mask8, n, length)
    plan = _plan(kinds, groups, constant_mask, renorm)
    stats = torch.empty(masked_stats_size(n, c, bool(renorm)), dtype=stat_dtype(x.dtype))
    y = torch.empty_like(x)
    total = ctypes.c_int64()
    _check(_FNS[x.dtype].layer_forward_masked(
        nlc, x.data_ptr(), mask8.data_ptr(), y.data_ptr(), n, c, length, plan.k, plan.kinds, plan.groups,
        constant_mask, int(softmax), stats.data_ptr(), _ptr(mean_weights), _ptr(var_weights), _ptr(running_mean),
        _ptr(running_var), _ptr(weight), _ptr(bias), eps, plan.renorm, ctypes.addressof(total),
        torch.get_num_threads()), "masked forward")
    return y, stats, total.value


def _backward_buffers(dy, x, nlc: int, axis: int, c: int, k: int, dtype, output_mask, softmax: bool):
    """``(dy, dx, dweight, dbias, dmean_weights, dvar_weights)`` for a backward call: ``dy``
    in x's dtype and layout, and an output buffer for each gradient asked for (None otherwise)."""
    if not (dy.dtype == x.dtype and axis == 1 and nlc == 0 and dy.is_contiguous()):
        dy = matching(dy, x, nlc, axis)
    want_dx, want_w, want_b, want_mw, want_vw = output_mask
    weights_dtype = weight_grad_dtype(dtype, softmax)
    dx = torch.empty_like(x) if want_dx else None
    dw = torch.empty(c, dtype=dtype) if want_w else None
    db = torch.empty(c, dtype=dtype) if want_b else None
    dmw = torch.empty(k, dtype=weights_dtype) if want_mw and k > 1 else None
    dvw = torch.empty(k, dtype=weights_dtype) if want_vw and k > 1 else None
    return dy, dx, dw, db, dmw, dvw


def layer_backward_masked(dy, x, mask8, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds,
                          groups, constant_mask, eps, axis, output_mask, renorm=None, softmax=False):
    """One C call: the masked backward sums, the mixer's backward, the masked dx. ``(dx,
    dweight, dbias, dmean_weights, dvar_weights)``, None where ``output_mask`` says not
    wanted. ``dy`` is converted to x's dtype and layout when it differs; the rest were
    validated by the forward that made ``stats``."""
    nlc, n, c, length = layout_of(x, axis)  # type: ignore[misc]
    plan = _plan(kinds, groups, constant_mask)
    k = plan.k
    dy, dx, dw, db, dmw, dvw = _backward_buffers(dy, x, nlc, axis, c, k, stats.dtype, output_mask, softmax)
    _check(_FNS[x.dtype].layer_backward_masked(
        nlc, dy.data_ptr(), x.data_ptr(), mask8.data_ptr(), _ptr(dx), n, c, length, k, plan.kinds, plan.groups,
        constant_mask, int(softmax), stats.data_ptr(), _ptr(mean_weights), _ptr(var_weights), _ptr(running_mean),
        _ptr(running_var), _ptr(weight), eps, int(bool(renorm)), _ptr(dw), _ptr(db), _ptr(dmw), _ptr(dvw),
        torch.get_num_threads()), "masked backward")
    return dx, dw, db, dmw, dvw


def layer_backward(dy, x, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                   constant_mask, eps, axis, output_mask, renorm=None, softmax=False, layout=None):
    """One C call: the two backward sums, the closed-form mix backward, dx (Batch Renorm's r
    and d come from ``stats``). Gradients not asked for in ``output_mask`` come back empty;
    with ``softmax`` the weights' gradients are the logits', in the statistics dtype."""
    grads = layer_backward_wanted(dy, x, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds,
                                  groups, constant_mask, eps, axis, output_mask, renorm, softmax, layout)
    weights_dtype = weight_grad_dtype(stats.dtype, softmax)
    return tuple(x.new_empty(0, dtype=kind) if g is None else g
                 for g, kind in zip(grads, (x.dtype, stats.dtype, stats.dtype, weights_dtype, weights_dtype)))


def weight_grad_dtype(stats_dtype: torch.dtype, softmax: bool) -> torch.dtype:
    """The dtype of the importance weights' gradients: float64 weights, or logits of the
    statistics dtype with ``softmax``."""
    return stats_dtype if softmax else torch.float64


def layer_backward_wanted(dy, x, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                          constant_mask, eps, axis, output_mask, renorm=None, softmax=False, layout=None):
    """:func:`layer_backward` with None for each gradient not asked for (no allocation)."""
    nlc, n, c, length = layout or layout_of(x, axis)  # type: ignore[misc]
    plan = _plan(kinds, groups, constant_mask)
    k = plan.k
    dy, dx, dw, db, dmw, dvw = _backward_buffers(dy, x, nlc, axis, c, k, stats.dtype, output_mask, softmax)
    _check(_FNS[x.dtype].layer_backward(
        nlc, dy.data_ptr(), x.data_ptr(), _ptr(dx), n, c, length, k, plan.kinds, plan.groups, constant_mask,
        int(softmax), stats.data_ptr(), _ptr(mean_weights), _ptr(var_weights), _ptr(running_mean), _ptr(running_var), _ptr(weight),
        eps, int(bool(renorm)), _ptr(dw), _ptr(db), _ptr(dmw), _ptr(dvw), torch.get_num_threads()), "backward")
    return dx, dw, db, dmw, dvw


def update_running(running_mean, running_var, stats, n, c, length, track, momentum, eps=0.0) -> None:
    """Move the running averages in place: track 1 from the batch statistics in ``stats``
    (over N*L values), track 2 from the per-sample moments averaged over samples, track 3
    Batch Renorm's rule from the batch statistics (``eps`` its variance shift)."""
    base = stats.data_ptr()
    item = stats.element_size()
    if track in (1, 3):  # pointers into stats, not views: this runs on every training call
        _update_batch(stats.dtype, c, n * length, base + (4 * n * c + c) * item, base + (4 * n * c + 2 * c) * item,
                      momentum, eps, track == 3, running_mean, running_var)
        return
    _UPDATE[stats.dtype](n, c, length, 1, base, base + n * c * item, momentum, running_mean.data_ptr(),
                         running_var.data_ptr())


CPU_KERNELS = KernelSet("cpu", _supports, _moments, _apply, _reduce, _backward_apply, masks=True)


def update_masked_running(running_mean, running_var, stats, n: int, c: int, total: int, momentum: float,
                          eps: float, renorm: bool) -> None:
    """Move the running averages in place from a masked layer's ``stats`` (its batch mean and
    biased variance over ``total`` valid values): PyTorch's rule (unbiased variance), or
    Batch Renorm's (``eps`` its variance shift). The caller checked that the running tensors
    are contiguous CPU ``(C,)`` of the statistics dtype."""
    base, item = stats.data_ptr(), stats.element_size()
    _update_batch(stats.dtype, c, total, base + (4 * n * c + c) * item, base + (4 * n * c + 2 * c) * item, momentum,
                  eps, renorm, running_mean, running_var)


def _update_batch(dtype, c: int, count: int, mean: int, var: int, momentum: float, eps: float, renorm: bool,
                  running_mean, running_var) -> None:
    if renorm:
        _UPDATE_RENORM[dtype](c, count, mean, var, momentum, eps, running_mean.data_ptr(), running_var.data_ptr())
    else:
        _UPDATE[dtype](1, c, count, 0, mean, var, momentum, running_mean.data_ptr(), running_var.data_ptr())
