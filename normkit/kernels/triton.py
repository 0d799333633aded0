"""Triton kernels for the four full-size passes of a fused normalization.

The passes are those of :class:`normkit.kernels.KernelSet` (see that module for the maths):
per-(n, c) moments, the affine ``y = (x - mu) * scale + shift``, the backward sums
``sum(dy)`` and ``sum(dy * (x - mean))``, and ``dx = dy * scale + (x - mean) * q + p``.
One set serves SN (every source mix), BN, GN, LN and IN on CUDA tensors; the O(N*C) mixing
stays in torch. Under ``TRITON_INTERPRET=1`` (read when this module is imported, as Triton
reads it when it decorates the kernels) the same kernels run on CPU tensors, which is how
the tests check them.

Layouts (``axis`` is the channel axis, x viewed as ``(N, C, L)``):

* channels-first, contiguous ``(N, C, *)`` with ``axis == 1``: each (n, c) row of L values
  is contiguous; a program reduces a block of rows (several short rows, or one long row
  split over several programs whose partial moments are merged).
* channels-last (``torch.channels_last`` / ``channels_last_3d``, or ``axis`` the last
  contiguous dim), memory ``(N, L, C)``: a program covers one sample, a block of channels
  (contiguous, coalesced loads) and a chunk of positions; partials are merged likewise.

Moments shift each row by its first value, run a per-lane Welford update and merge lanes
and programs exactly (Chan, Golub & LeVeque, 1979); never ``E[x^2] - E[x]^2``, so
``1e4 + N(0, 1)`` in float32 keeps its variance. Statistics and arithmetic are float32
(float64 for float64 input); outputs keep x's dtype and layout. Block sizes come from a
small heuristic (no autotuning, so the first call is not slowed by benchmarking and
interpreter runs stay short).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from normkit._core import stat_dtype
from normkit.kernels._protocol import KernelSet

__all__ = ["TRITON_KERNELS", "INTERPRET"]

#: Whether the kernels were decorated in Triton's interpreter (then they run on CPU tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCE_TILE = 2048  # elements a reduction program holds per step (3 float32 accumulators each)
_APPLY_TILE = 4096  # elements an elementwise program handles
_MAX_INDEX = 2**31 - 1  # per-sample offsets are int32 (the sample base is int64)
# Every launch passes enable_fp_fusion=True (FMA contraction, Triton's default so far):
# explicit, so that Triton >= 3.9 does not warn that its default will change.


# --------------------------------------------------------------------------- kernels


@triton.jit
def _reduction_program(KEEP, SPLITS, BLOCK_K: tl.constexpr):
    """This reduction program's (split, group, rows of the group, row validity): programs
    enumerate (group, block of BLOCK_K rows, split) with the split fastest."""
    pid = tl.program_id(0)
    rest = pid // SPLITS
    keep_blocks = tl.cdiv(KEEP, BLOCK_K)
    keep = (rest % keep_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    return pid % SPLITS, rest // keep_blocks, keep, keep < KEEP


@triton.jit
def _moments_kernel(
    x_ptr, mean_ptr, var_ptr, shift_ptr,
    KEEP, RED, STRIDE_GROUP, STRIDE_KEEP, STRIDE_RED, CHUNK, SPLITS, OUT_STRIDE,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Mean and biased variance over RED positions of each of KEEP rows per group.

    Element (group g, row k, position r) is at g * STRIDE_GROUP + k * STRIDE_KEEP +
    r * STRIDE_RED. Program (g, row block, split s) covers positions [s*CHUNK, (s+1)*CHUNK)
    and writes its statistics at s * OUT_STRIDE + g * KEEP + k. Values are shifted by the
    row's first one, so rounding scales with the spread of x, not with its offset; with
    SPLITS > 1 the partial means stay shifted and split 0 stores the shifts.
    """
    acc_dtype = mean_ptr.dtype.element_ty
    split, group, keep, keep_ok = _reduction_program(KEEP, SPLITS, BLOCK_K)
    rows = x_ptr + group.to(tl.int64) * STRIDE_GROUP + keep.to(tl.int64) * STRIDE_KEEP
    shift = tl.load(rows, mask=keep_ok, other=0.0).to(acc_dtype)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, RED)
    mean = tl.zeros([BLOCK_K, BLOCK_R], dtype=acc_dtype)
    m2 = tl.zeros([BLOCK_K, BLOCK_R], dtype=acc_dtype)
    count = tl.zeros([BLOCK_R], dtype=acc_dtype)
    for r0 in range(start, end, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R)
        pos_ok = pos < end
        x = tl.load(rows[:, None] + pos[None, :] * STRIDE_RED, mask=keep_ok[:, None] & pos_ok[None, :], other=0.0)
        x = x.to(acc_dtype) - shift[:, None]
        # Per-lane Welford step; lanes past the end keep their state (delta = 0).
        count = count + pos_ok.to(acc_dtype)
        delta = tl.where(pos_ok[None, :], x - mean, 0.0)
        mean = mean + delta / tl.maximum(count, 1.0)[None, :]
        m2 = m2 + delta * (x - mean)
    # Exact merge of the lanes (Chan et al.): pooled mean, then within + between squares.
    lane_count = tl.broadcast_to(count[None, :], [BLOCK_K, BLOCK_R])
    n_row = tl.sum(lane_count, 1)
    mean_row = tl.sum(mean * lane_count, 1) / tl.maximum(n_row, 1.0)
    spread = mean - mean_row[:, None]
    m2_row = tl.sum(m2 + lane_count * spread * spread, 1)
    out = split * OUT_STRIDE + group * KEEP + keep
    if SPLITS == 1:
        mean_row += shift
    elif split == 0:
        tl.store(shift_ptr + group * KEEP + keep, shift, mask=keep_ok)
    tl.store(mean_ptr + out, mean_row, mask=keep_ok)
    tl.store(var_ptr + out, tl.maximum(m2_row, 0.0) / tl.maximum(n_row, 1.0), mask=keep_ok)


@triton.jit
def _merge_kernel(
    part_mean_ptr, part_var_ptr, shift_ptr, mean_ptr, var_ptr, ROWS, RED, CHUNK, SPLITS, BLOCK: tl.constexpr
):
    """Exact merge of each row's SPLITS partial (shifted mean, variance), as
    :func:`normkit.functional.merge_moments` does, in one launch instead of a dozen."""
    acc_dtype = mean_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < ROWS
    total = tl.zeros([BLOCK], dtype=acc_dtype)
    for s in range(SPLITS):
        count = tl.minimum(CHUNK, RED - s * CHUNK).to(acc_dtype)
        total += count * tl.load(part_mean_ptr + s * ROWS + rows, mask=ok, other=0.0)
    mean = total / RED
    m2 = tl.zeros([BLOCK], dtype=acc_dtype)
    for s in range(SPLITS):
        count = tl.minimum(CHUNK, RED - s * CHUNK).to(acc_dtype)
        spread = tl.load(part_mean_ptr + s * ROWS + rows, mask=ok, other=0.0) - mean
        m2 += count * (tl.load(part_var_ptr + s * ROWS + rows, mask=ok, other=0.0) + spread * spread)
    tl.store(mean_ptr + rows, mean + tl.load(shift_ptr + rows, mask=ok, other=0.0), mask=ok)
    tl.store(var_ptr + rows, m2 / RED, mask=ok)


@triton.jit
def _reduce_kernel(
    dy_ptr, x_ptr, mean_ptr, sum_dy_ptr, sum_dyxc_ptr,
    KEEP, RED, STRIDE_GROUP, STRIDE_KEEP, STRIDE_RED, CHUNK, SPLITS, OUT_STRIDE,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """sum(dy) and sum(dy * (x - mean)) per row; same indexing as _moments_kernel."""
    acc_dtype = sum_dy_ptr.dtype.element_ty
    split, group, keep, keep_ok = _reduction_program(KEEP, SPLITS, BLOCK_K)
    offsets = group.to(tl.int64) * STRIDE_GROUP + keep.to(tl.int64)[:, None] * STRIDE_KEEP
    mean = tl.load(mean_ptr + group * KEEP + keep, mask=keep_ok, other=0.0).to(acc_dtype)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, RED)
    acc_dy = tl.zeros([BLOCK_K, BLOCK_R], dtype=acc_dtype)
    acc_dyxc = tl.zeros([BLOCK_K, BLOCK_R], dtype=acc_dtype)
    for r0 in range(start, end, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R)
        ok = keep_ok[:, None] & (pos < end)[None, :]
        at = offsets + pos[None, :] * STRIDE_RED
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(acc_dtype)
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(acc_dtype)
        acc_dy += dy
        acc_dyxc += dy * (x - mean[:, None])  # masked lanes have dy = 0
    out = split * OUT_STRIDE + group * KEEP + keep
    tl.store(sum_dy_ptr + out, tl.sum(acc_dy, 1), mask=keep_ok)
    tl.store(sum_dyxc_ptr + out, tl.sum(acc_dyxc, 1), mask=keep_ok)


@triton.jit
def _load_stat(ptr, rows, cols, row_ok, ok, C, L, S_N, S_C, CHANNELS_LAST: tl.constexpr):
    """stat[n, c] (any strides, e.g. expanded) for the tile (rows, cols) of the 2-D view of x."""
    if CHANNELS_LAST:  # rows are (n, l) positions, cols are channels
        return tl.load(ptr + (rows // L)[:, None] * S_N + cols[None, :] * S_C, mask=ok, other=0.0)
    else:  # rows are (n, c) pairs, cols are positions: one value per row
        return tl.load(ptr + (rows // C) * S_N + (rows % C) * S_C, mask=row_ok, other=0.0)[:, None]


@triton.jit
def _load_channel(ptr, rows, cols, row_ok, ok, C, S_C, CHANNELS_LAST: tl.constexpr):
    """vec[c] of a per-channel vector for the tile (rows, cols)."""
    if CHANNELS_LAST:
        return tl.load(ptr + cols[None, :] * S_C, mask=ok, other=0.0)
    else:
        return tl.load(ptr + (rows % C) * S_C, mask=row_ok, other=0.0)[:, None]


@triton.jit
def _tile(ROWS, COLS, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """This program's tile of x viewed as a row-major (ROWS, COLS) matrix."""
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(COLS, BLOCK_COLS)
    rows = (pid // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok = rows < ROWS
    ok = row_ok[:, None] & (cols < COLS)[None, :]
    return rows, cols, row_ok, ok, rows.to(tl.int64)[:, None] * COLS + cols[None, :]


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr, mu_ptr, scale_ptr, shift_ptr,
    ROWS, COLS, C, L,
    MU_SN, MU_SC, SCALE_SN, SCALE_SC, SHIFT_SC,
    CHANNELS_LAST: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """y = (x - mu[n, c]) * scale[n, c] + shift[c] over x viewed as a row-major (ROWS, COLS)."""
    acc_dtype = mu_ptr.dtype.element_ty
    rows, cols, row_ok, ok, at = _tile(ROWS, COLS, BLOCK_ROWS, BLOCK_COLS)
    mu = _load_stat(mu_ptr, rows, cols, row_ok, ok, C, L, MU_SN, MU_SC, CHANNELS_LAST)
    scale = _load_stat(scale_ptr, rows, cols, row_ok, ok, C, L, SCALE_SN, SCALE_SC, CHANNELS_LAST)
    shift = _load_channel(shift_ptr, rows, cols, row_ok, ok, C, SHIFT_SC, CHANNELS_LAST)
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(acc_dtype)
    y = (x - mu) * scale + shift  # subtract first: keeps the digits of inputs with a large offset
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_apply_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, scale_ptr, p_ptr, q_ptr,
    ROWS, COLS, C, L,
    MEAN_SN, MEAN_SC, SCALE_SN, SCALE_SC, P_SN, P_SC, Q_SN, Q_SC,
    CHANNELS_LAST: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """dx = dy * scale[n, c] + (x - mean[n, c]) * q[n, c] + p[n, c]."""
    acc_dtype = mean_ptr.dtype.element_ty
    rows, cols, row_ok, ok, at = _tile(ROWS, COLS, BLOCK_ROWS, BLOCK_COLS)
    mean = _load_stat(mean_ptr, rows, cols, row_ok, ok, C, L, MEAN_SN, MEAN_SC, CHANNELS_LAST)
    scale = _load_stat(scale_ptr, rows, cols, row_ok, ok, C, L, SCALE_SN, SCALE_SC, CHANNELS_LAST)
    p = _load_stat(p_ptr, rows, cols, row_ok, ok, C, L, P_SN, P_SC, CHANNELS_LAST)
    q = _load_stat(q_ptr, rows, cols, row_ok, ok, C, L, Q_SN, Q_SC, CHANNELS_LAST)
    dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(acc_dtype)
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(acc_dtype)
    dx = dy * scale + (x - mean) * q + p
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- launch helpers


class _Layout(NamedTuple):
    """x as (N, C, L): channels-first rows of L, or channels-last (N, L, C) memory."""

    channels_last: bool
    n: int
    c: int
    length: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def _block(extent: int, cap: int) -> int:
    """Power-of-2 block for ``extent`` values, at most ``cap``, wasting the fewest lanes
    (3136 = 56 * 56 takes 7 blocks of 512, not 4 of 1024)."""
    if extent <= cap:
        return _pow2(extent)
    sizes = [cap >> k for k in range(3) if cap >> k >= 32]
    return min(sizes, key=lambda b: (_cdiv(extent, b) * b, -b))


def _channels_last_order(ndim: int, axis: int) -> list[int]:
    return [0] + [d for d in range(1, ndim) if d != axis] + [axis]


def _layout(x: Tensor, axis: int) -> Optional[_Layout]:
    """How the kernels see x, or None when x is neither channels-first nor channels-last."""
    if x.dim() < 2 or not 1 <= axis < x.dim():
        return None
    n, c = x.shape[0], x.shape[axis]
    length = x.numel() // max(n * c, 1)
    if axis == 1 and x.is_contiguous():
        return _Layout(False, n, c, length)
    if x.permute(_channels_last_order(x.dim(), axis)).is_contiguous():
        return _Layout(True, n, c, length)
    return None


def _like_layout(t: Tensor, layout: _Layout, axis: int) -> Tensor:
    """t (a gradient of x's shape) in x's memory layout, copied only when it differs."""
    if not layout.channels_last:
        return t.contiguous()
    order = _channels_last_order(t.dim(), axis)
    permuted = t.permute(order)
    if permuted.is_contiguous():
        return t
    inverse = sorted(range(t.dim()), key=order.__getitem__)
    return permuted.contiguous().permute(inverse)


_sm_count: dict[int, int] = {}


def _min_programs(x: Tensor) -> int:
    """Programs needed to fill the device: two per SM (1 in the interpreter: fewer is faster)."""
    if not x.is_cuda:
        return 1
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _sm_count[index]


def _warps(tile: int) -> int:
    return max(1, min(8, tile // 512))


class _ReducePlan(NamedTuple):
    groups: int
    keep: int
    red: int
    stride_group: int
    stride_keep: int
    stride_red: int
    block_k: int
    block_r: int
    splits: int
    chunk: int

    @property
    def grid(self) -> tuple[int]:
        return (self.groups * _cdiv(self.keep, self.block_k) * self.splits,)


def _reduce_plan(x: Tensor, layout: _Layout, split: Optional[int]) -> _ReducePlan:
    """Tiling of a per-(n, c) reduction; ``split`` forces the number of position chunks."""
    n, c, length = layout.n, layout.c, layout.length
    want = _min_programs(x)
    if layout.channels_last:  # per sample: C contiguous rows kept, L positions reduced
        groups, keep, stride_group, stride_keep, stride_red = n, c, length * c, 1, c
        block_k = min(_pow2(keep), 128)
        block_r = max(1, min(_pow2(length), _REDUCE_TILE // block_k))
    else:  # all N*C rows of L contiguous positions
        groups, keep, stride_group, stride_keep, stride_red = 1, n * c, 0, length, 1
        block_r = _block(length, _REDUCE_TILE)
        block_k = max(1, min(_pow2(keep), _REDUCE_TILE // block_r))
        while block_k > 1 and _cdiv(keep, block_k) < want:  # short rows: spread them out
            block_k //= 2
    programs = groups * _cdiv(keep, block_k)
    red_blocks = _cdiv(length, block_r)
    if split is None:  # few long rows: split positions over programs, merge the partials
        split = min(red_blocks, _cdiv(want, programs)) if programs < want else 1
    chunk = _cdiv(red_blocks, max(1, min(split, red_blocks))) * block_r
    return _ReducePlan(
        groups, keep, length, stride_group, stride_keep, stride_red, block_k, block_r, _cdiv(length, chunk), chunk
    )


def _apply_plan(x: Tensor, layout: _Layout) -> tuple[int, int, int, int, tuple[int]]:
    """x as a row-major (rows, cols) matrix and its tiles: (rows, cols, block_rows, block_cols, grid)."""
    if layout.channels_last:
        rows, cols = layout.n * layout.length, layout.c
    else:
        rows, cols = layout.n * layout.c, layout.length
    block_cols = _block(cols, 1024)
    block_rows = max(1, min(_pow2(rows), _APPLY_TILE // block_cols))
    want = _min_programs(x)
    while block_rows > 1 and _cdiv(rows, block_rows) * _cdiv(cols, block_cols) < want:
        block_rows //= 2
    return rows, cols, block_rows, block_cols, (_cdiv(rows, block_rows) * _cdiv(cols, block_cols),)


# --------------------------------------------------------------------------- the four passes


def supports(x: Tensor, axis: int) -> Optional[str]:
    """None for CUDA tensors (CPU ones under ``TRITON_INTERPRET=1``), floating point,
    channels-first contiguous with ``axis == 1`` or channels-last with ``axis`` the innermost
    dim; otherwise the reason this set does not serve ``x``."""
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} is not one of {_DTYPES}"
    if x.numel() == 0:
        return "empty input"
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        return f"the Triton kernels run on CUDA tensors, got a {x.device.type} tensor"
    layout = _layout(x, axis)
    if layout is None:
        return f"memory layout with strides {x.stride()} is neither channels-first nor channels-last"
    per_sample, rows = layout.c * layout.length, layout.n * max(layout.c, layout.length)
    if per_sample > _MAX_INDEX or rows > _MAX_INDEX:
        return "a sample or the row count exceeds int32 indexing"
    return None


def moments(x: Tensor, axis: int, *, split: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance, shape (N, C), float32 (float64 for float64 x).

    ``split`` forces the number of chunks each row's positions are cut into (tests).
    """
    layout = _layout(x, axis)
    plan = _reduce_plan(x, layout, split)
    dtype = stat_dtype(x.dtype)
    rows = layout.n * layout.c
    mean = torch.empty(plan.splits, rows, dtype=dtype, device=x.device)
    var = torch.empty_like(mean)
    shift = torch.empty(rows, dtype=dtype, device=x.device) if plan.splits > 1 else mean
    _moments_kernel[plan.grid](
        x, mean, var, shift,
        plan.keep, plan.red, plan.stride_group, plan.stride_keep, plan.stride_red, plan.chunk, plan.splits, rows,
        BLOCK_K=plan.block_k, BLOCK_R=plan.block_r,
        num_warps=_warps(plan.block_k * plan.block_r), enable_fp_fusion=True,
    )
    if plan.splits > 1:
        part_mean, part_var = mean, var
        mean, var = torch.empty(rows, dtype=dtype, device=x.device), torch.empty(rows, dtype=dtype, device=x.device)
        block = min(_pow2(rows), 1024)
        _merge_kernel[(_cdiv(rows, block),)](
            part_mean, part_var, shift, mean, var, rows, plan.red, plan.chunk, plan.splits,
            BLOCK=block, num_warps=4, enable_fp_fusion=True,
        )
    return mean.reshape(layout.n, layout.c), var.reshape(layout.n, layout.c)


def apply(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor, axis: int) -> Tensor:
    """``y = (x - mu[n, c]) * scale[n, c] + shift[c]`` in x's dtype and memory layout."""
    layout = _layout(x, axis)
    dtype = stat_dtype(x.dtype)
    mu, scale, shift = mu.to(dtype), scale.to(dtype), shift.to(dtype)
    y = torch.empty_like(x)
    rows, cols, block_rows, block_cols, grid = _apply_plan(x, layout)
    _apply_kernel[grid](
        x, y, mu, scale, shift,
        rows, cols, layout.c, layout.length,
        mu.stride(0), mu.stride(1), scale.stride(0), scale.stride(1), shift.stride(0),
        CHANNELS_LAST=layout.channels_last, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=_warps(block_rows * block_cols), enable_fp_fusion=True,
    )
    return y


def reduce(dy: Tensor, x: Tensor, mean: Tensor, axis: int, *, split: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum(dy)`` and ``sum(dy * (x - mean))``, shape (N, C), statistics dtype."""
    layout = _layout(x, axis)
    dy = _like_layout(dy, layout, axis)
    plan = _reduce_plan(x, layout, split)
    dtype = stat_dtype(x.dtype)
    rows = layout.n * layout.c
    mean = mean.to(dtype).contiguous()
    sum_dy = torch.empty(plan.splits, rows, dtype=dtype, device=x.device)
    sum_dyxc = torch.empty_like(sum_dy)
    _reduce_kernel[plan.grid](
        dy, x, mean, sum_dy, sum_dyxc,
        plan.keep, plan.red, plan.stride_group, plan.stride_keep, plan.stride_red, plan.chunk, plan.splits, rows,
        BLOCK_K=plan.block_k, BLOCK_R=plan.block_r,
        num_warps=_warps(plan.block_k * plan.block_r), enable_fp_fusion=True,
    )
    if plan.splits > 1:
        sum_dy, sum_dyxc = sum_dy.sum(0), sum_dyxc.sum(0)
    return sum_dy.reshape(layout.n, layout.c), sum_dyxc.reshape(layout.n, layout.c)


def backward_apply(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, p: Tensor, q: Tensor, axis: int) -> Tensor:
    """``dx = dy * scale[n, c] + (x - mean[n, c]) * q[n, c] + p[n, c]`` in x's dtype and layout."""
    layout = _layout(x, axis)
    dy = _like_layout(dy, layout, axis)
    dtype = stat_dtype(x.dtype)
    mean, scale, p, q = (t.to(dtype) for t in (mean, scale, p, q))
    dx = torch.empty_like(x)
    rows, cols, block_rows, block_cols, grid = _apply_plan(x, layout)
    _backward_apply_kernel[grid](
        dy, x, dx, mean, scale, p, q,
        rows, cols, layout.c, layout.length,
        mean.stride(0), mean.stride(1), scale.stride(0), scale.stride(1),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        CHANNELS_LAST=layout.channels_last, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        num_warps=_warps(block_rows * block_cols), enable_fp_fusion=True,
    )
    return dx


TRITON_KERNELS = KernelSet("triton", supports, moments, apply, reduce, backward_apply)
