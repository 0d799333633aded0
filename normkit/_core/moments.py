"""Per-(sample, channel) moments and their exact merges (Chan et al.), with masks.

Statistics are float32 for every input dtype but float64 (which stays float64); variances
are two-pass (mean of squared deviations), never ``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "broadcast_mask",
    "expand_stat",
    "mask_for",
    "merge_moments",
    "moments",
    "normalize_axis",
    "reduce_dims",
    "stat_dtype",
    "sum_positions",
]


class Moments(NamedTuple):
    """Statistics of a set of values: how many, their mean and their biased variance.

    Shapes broadcast against each other; ``count`` is a float tensor so that masked and
    merged statistics (whose counts differ per sample or per rank) share one code path.
    """

    count: Tensor
    mean: Tensor
    var: Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float64 for float64 inputs and float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-D input; expected -{ndim} <= axis < {ndim}")
    return axis % ndim


def reduce_dims(ndim: int, channel_axis: int) -> list[int]:
    """The dims that per-(sample, channel) moments reduce over: all but batch and channel."""
    return [d for d in range(1, ndim) if d != channel_axis]


def sum_positions(t: Tensor, dims: list[int]) -> Tensor:
    """Sum over the position dims; an input without positions, e.g. (N, C), is its own sum."""
    return t.sum(dim=dims) if dims else t


def expand_stat(stat: Tensor, ndim: int, channel_axis: int) -> Tensor:
    """View an (N or 1, C or 1) statistic so that it broadcasts against the input."""
    shape = [1] * ndim
    shape[0] = stat.shape[0]
    shape[channel_axis] = stat.shape[1]
    return stat.reshape(shape)


def broadcast_mask(mask: Tensor, target: Sequence[int], device: torch.device, what: str) -> Tensor:
    """Check a validity mask and broadcast it to ``target`` (errors say how to fix the call).

    The mask must have exactly ``len(target)`` dims (sizes 1 broadcast): right-aligned
    broadcasting of fewer dims would silently read a per-sample ``(N,)`` mask as a mask
    over the last axis whenever ``N`` equals that axis' size.
    """
    target = tuple(target)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"mask must be a bool tensor (True = valid position), got {got}; convert it with mask.bool() "
            f"or build it with a comparison such as positions < lengths[:, None]"
        )
    if mask.dim() != len(target):
        fix = (
            "add size-1 dims, e.g. mask[None] (same for every sample) or mask[:, None] (per sample)"
            if mask.dim() < len(target)
            else "drop the extra dims, e.g. mask.squeeze(1) for an (N, 1, L) mask"
        )
        raise ValueError(
            f"mask must have {len(target)} dims, the shape of {what} {target} (sizes 1 broadcast), got shape "
            f"{tuple(mask.shape)}; {fix}"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the input is on {device}; move it with mask.to(x.device)")
    try:
        return mask.broadcast_to(target)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the shape of {what} {target}"
        ) from None


def mask_for(x: Tensor, mask: Tensor, channel_axis: int) -> Tensor:
    """Broadcast a validity mask (the input's shape without its channel axis) to x's rank."""
    target = list(x.shape)
    del target[channel_axis]
    return broadcast_mask(mask, target, x.device, "the input without its channel axis").unsqueeze(channel_axis)


def moments(x: Tensor, channel_axis: int = 1, mask: Optional[Tensor] = None) -> Moments:
    r"""Per-(sample, channel) count, mean and biased variance of ``x``.

    Args:
        x: input of shape ``(N, ..., C, ...)`` with the channel dim at ``channel_axis``.
        channel_axis: the feature axis (default 1, channels-first; -1 for channels-last).
        mask: optional bool tensor of ``x``'s shape without the channel axis (same rank;
            sizes 1 broadcast), True for valid positions: ``(N, L)`` for ``(N, C, L)`` and
            ``(N, L, C)``, ``(N, H, W)`` for images, ``(N, 1, W)`` or ``(1, L)`` shared.
            Only valid positions count, and padded values (even NaN / inf) never reach the
            statistics or their gradients; a sample with none gets count 0, mean 0 and
            variance 0.

    Returns:
        :class:`Moments` with ``count`` of shape ``(N, 1)`` and ``mean`` / ``var`` of shape
        ``(N, C)``, in float32 (float64 for float64 input). Differentiable.

    The variance is computed as the mean of squared deviations from the mean (two passes),
    never as ``E[x^2] - E[x]^2``, which loses every digit for inputs like ``1e4 + N(0, 1)``
    in float32.
    """
    channel_axis = normalize_axis(channel_axis, x.dim())
    xs = x.to(stat_dtype(x.dtype))
    dims = reduce_dims(x.dim(), channel_axis)
    n, c = x.shape[0], x.shape[channel_axis]
    if mask is None:
        length = math.prod([x.shape[d] for d in dims])
        count = torch.full((n, 1), float(length), dtype=xs.dtype, device=x.device)
        if not dims:  # (N, C): one value per (sample, channel)
            return Moments(count, xs, torch.zeros_like(xs))
        if x.numel() == 0:  # e.g. an empty rank of a synced batch; var_mean would warn
            zeros = xs.sum(dims).reshape(n, c)
            return Moments(count, zeros, zeros)
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        return Moments(count, mean.reshape(n, c), var.reshape(n, c))
    valid = mask_for(x, mask, channel_axis)
    weight = valid.to(xs.dtype)
    count = sum_positions(weight, dims).reshape(n, 1)
    denom = count.clamp_min(1.0)
    # where() rather than multiplication, so that NaN/inf in padded positions stay out.
    xv = torch.where(valid, xs, 0.0)
    total = sum_positions(xv, dims).reshape(n, c)
    mean = total / denom
    centred = torch.where(valid, xs - expand_stat(mean, x.dim(), channel_axis), 0.0)
    sq = centred.square()
    var = sum_positions(sq, dims).reshape(n, c) / denom
    return Moments(count, mean, var)


def merge_moments(m: Moments, dim: int) -> Moments:
    """Exact merge (Chan et al.) of statistics along ``dim``, keeping it with size 1.

    ``count`` must already broadcast to ``mean``. Groups with zero total count give mean 0
    and variance 0, never NaN.
    """
    count = m.count.expand_as(m.mean)
    total = count.sum(dim, keepdim=True)
    share = count / total.clamp_min(torch.finfo(total.dtype).tiny)
    mean = (share * m.mean).sum(dim, keepdim=True)
    var = (share * (m.var + (m.mean - mean).square())).sum(dim, keepdim=True)
    return Moments(total, mean, var)
