"""Float64 references written from the definitions, independent of normkit's code.

Each statistic is computed directly over its own set of values (no moments reuse, no Chan
merge), so a bug in normkit's derivations cannot hide in the reference.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _as_ncl(x: Tensor, axis: int) -> Tensor:
    x = x.double().movedim(axis, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _stats_over(values: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    mean = values.mean(dim=tuple(dims), keepdim=True)
    var = ((values - mean) ** 2).mean(dim=tuple(dims), keepdim=True)
    return mean, var


def source_stats(x: Tensor, source: str, axis: int = 1) -> tuple[Tensor, Tensor]:
    """(mean, biased var) of one source, broadcastable to the (N, C, L) view of x."""
    v = _as_ncl(x, axis)
    n, c, _ = v.shape
    if source == "in":
        return _stats_over(v, (2,))
    if source == "ln":
        return _stats_over(v, (1, 2))
    if source == "bn":
        return _stats_over(v, (0, 2))
    groups = int(source[2:])
    g = v.reshape(n, groups, -1)
    mean, var = _stats_over(g, (2,))
    rep = c // groups
    return mean.repeat_interleave(rep, 1), var.repeat_interleave(rep, 1)


def switch_norm(
    x: Tensor,
    sources: Sequence[str],
    mean_weights: Optional[Sequence[float]] = None,
    var_weights: Optional[Sequence[float]] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    axis: int = 1,
    running: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """SN in float64; ``running`` replaces the BN source's statistics (eval mode)."""
    k = len(sources)
    wm = torch.tensor(mean_weights if mean_weights is not None else [1.0 / k] * k, dtype=torch.float64)
    wv = torch.tensor(var_weights if var_weights is not None else [1.0 / k] * k, dtype=torch.float64)
    v = _as_ncl(x, axis)
    mu = torch.zeros(()).double()
    var = torch.zeros(()).double()
    for i, s in enumerate(sources):
        if s == "bn" and running is not None:
            m, s2 = running[0].double().reshape(1, -1, 1), running[1].double().reshape(1, -1, 1)
        else:
            m, s2 = source_stats(x, s, axis)
        mu = mu + wm[i] * m
        var = var + wv[i] * s2
    y = (v - mu) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double().reshape(1, -1, 1)
    if bias is not None:
        y = y + bias.double().reshape(1, -1, 1)
    moved = x.movedim(axis, 1)
    return y.reshape(moved.shape).movedim(1, axis)


def running_after(batches: Sequence[Tensor], momentum: Optional[float], axis: int = 1) -> tuple[Tensor, Tensor]:
    """Running mean / var of a BN source after training on ``batches`` (PyTorch convention)."""
    c = batches[0].shape[axis]
    rm = torch.zeros(c, dtype=torch.float64)
    rv = torch.ones(c, dtype=torch.float64)
    for i, b in enumerate(batches, 1):
        v = _as_ncl(b, axis).transpose(0, 1).reshape(c, -1)
        n = v.shape[1]
        mean = v.mean(1)
        unbiased = ((v - mean[:, None]) ** 2).sum(1) / (n - 1)
        f = momentum if momentum is not None else 1.0 / i
        rm = (1 - f) * rm + f * mean
        rv = (1 - f) * rv + f * unbiased
    return rm, rv
