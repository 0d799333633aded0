"""The passes in composed ATen ops: any device, any dtype; the generic fused path's
reference kernel set (what the tests use to check that path without a compiler)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from normkit._core import apply_affine, expand_stat, moments, reduce_dims, sum_positions
from normkit.kernels._protocol import KernelSet

__all__ = ["ATEN_KERNELS"]


def _supports(x: Tensor, axis: int) -> Optional[str]:
    return None


def _moments(x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    m = moments(x, axis)
    return m.mean, m.var


def _reduce(dy: Tensor, x: Tensor, mean: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    dims = reduce_dims(x.dim(), axis)
    n, c = mean.shape
    dys = dy.to(mean.dtype)
    centred = x.to(mean.dtype) - expand_stat(mean, x.dim(), axis)
    return sum_positions(dys, dims).reshape(n, c), sum_positions(dys * centred, dims).reshape(n, c)


def _backward_apply(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, p: Tensor, q: Tensor, axis: int) -> Tensor:
    nd = x.dim()
    dx = dy.to(mean.dtype) * expand_stat(scale, nd, axis)
    dx = dx + (x.to(mean.dtype) - expand_stat(mean, nd, axis)) * expand_stat(q, nd, axis)
    return (dx + expand_stat(p, nd, axis)).to(x.dtype)


ATEN_KERNELS = KernelSet("aten", _supports, _moments, apply_affine, _reduce, _backward_apply)
