"""Float64 references written from the definitions, independent of normkit's code.

Each statistic is computed directly over its own set of values (no moments reuse, no Chan
merge), sample by sample on the packed valid values, so a bug in normkit's derivations (or in
its mask handling) cannot hide in the reference. Everything here is differentiable by autograd.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

DOUBLE = torch.float64
Weights = Union[Sequence[float], Tensor, None]


def _channels_first(x: Tensor, axis: int) -> Tensor:
    """The (N, C, L) float64 view of x with its channels on ``axis``."""
    v = x.to(DOUBLE).movedim(axis, 1)
    return v.reshape(v.shape[0], v.shape[1], math.prod(v.shape[2:]))


def _valid(x: Tensor, axis: int, mask: Optional[Tensor]) -> Tensor:
    """(N, L) bool: True at the valid positions (``mask``: the shape of x without its channel
    axis, or broadcastable to it; None: every position)."""
    rest = x.movedim(axis, 1).shape
    rest = (rest[0], *rest[2:])
    valid = torch.ones(rest, dtype=torch.bool) if mask is None else mask.broadcast_to(rest)
    return valid.reshape(rest[0], math.prod(rest[1:]))


def packed(x: Tensor, axis: int = 1, mask: Optional[Tensor] = None) -> list[Tensor]:
    """Each sample's valid values, (C, L_i) float64."""
    v = _channels_first(x, axis)
    valid = _valid(x, axis, mask)
    return [v[i][:, valid[i]] for i in range(v.shape[0])]


def _sample_stats(s: Tensor, source: str, batch: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(mean, biased var), (C,) each, of one source for one sample's values s (C, L_i);
    ``batch``: the BN source's statistics."""
    c = s.shape[0]
    if source == "in":
        return s.mean(1), s.var(1, correction=0)
    if source == "ln":
        return s.mean().expand(c), s.var(correction=0).expand(c)
    if source == "bn":
        return batch
    groups = int(source[2:])  # 'gnG': the channels of a group are adjacent
    g = s.reshape(groups, -1)
    return g.mean(1).repeat_interleave(c // groups), g.var(1, correction=0).repeat_interleave(c // groups)


def _weights(w: Weights, k: int) -> Tensor:
    if w is None:
        return torch.full((k,), 1.0 / k, dtype=DOUBLE)
    return w.to(DOUBLE) if isinstance(w, Tensor) else torch.tensor(w, dtype=DOUBLE)


def switch_norm(
    x: Tensor,
    sources: Sequence[str],
    mean_weights: Weights = None,
    var_weights: Weights = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    axis: int = 1,
    running: Optional[tuple[Tensor, Tensor]] = None,
    *,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """SN (any sources: 'in', 'ln', 'bn', 'gnG') in float64, in x's layout.

    ``mean_weights`` / ``var_weights``: the mix (sequences, or tensors to differentiate, e.g.
    ``torch.softmax(logits, 0)``); None: uniform. ``mask`` (True = valid; the shape of x
    without its channel axis, or broadcastable to it): every statistic over the valid values
    only (BN: all valid values of the batch), padded outputs 0. ``running`` (mean, var)
    replaces the BN source's batch statistics (eval mode).
    """
    v = _channels_first(x, axis)
    n, c, length = v.shape
    valid = _valid(x, axis, mask)
    samples = [v[i][:, valid[i]] for i in range(n)]
    if running is not None:
        batch = running[0].to(DOUBLE), running[1].to(DOUBLE)
    else:
        everything = torch.cat(samples, 1)
        batch = (everything.mean(1), everything.var(1, correction=0)) if everything.shape[1] else None
    wm, wv = _weights(mean_weights, len(sources)), _weights(var_weights, len(sources))
    outs = [torch.zeros(0, c, length, dtype=DOUBLE)]  # (an empty batch: no sample)
    for i, s in enumerate(samples):
        out = torch.zeros(c, length, dtype=DOUBLE)
        if s.shape[1]:
            stats = [_sample_stats(s, source, batch) for source in sources]
            mu = sum(wm[j] * m for j, (m, _) in enumerate(stats))
            var = sum(wv[j] * s2 for j, (_, s2) in enumerate(stats))
            y = (s - mu[:, None]) / torch.sqrt(var[:, None] + eps)
            if weight is not None:
                y = y * weight.to(DOUBLE)[:, None]
            if bias is not None:
                y = y + bias.to(DOUBLE)[:, None]
            out[:, valid[i]] = y
        outs.append(out[None])
    moved = x.movedim(axis, 1).shape
    return torch.cat(outs).reshape(moved).movedim(1, axis)


def from_params(x: Tensor, sources: Sequence[str], params: Mapping[str, Tensor], eps: float = 1e-5,
                axis: int = 1, **kw) -> Tensor:
    """:func:`switch_norm` with a layer's named parameters (``weight``, ``bias``, and the mix as
    the softmax of ``mean_logits`` / ``var_logits``; missing ones: no affine, a uniform mix),
    differentiable in each of them."""
    wm, wv = (
        torch.softmax(params[k].to(DOUBLE), 0) if params.get(k) is not None else None
        for k in ("mean_logits", "var_logits")
    )
    return switch_norm(x, sources, wm, wv, params.get("weight"), params.get("bias"), eps, axis, **kw)


def of_layer(layer, x: Tensor, sources: Sequence[str], axis: int = 1, **kw) -> Tensor:
    """:func:`from_params` with ``layer``'s parameters and eps."""
    return from_params(x, sources, dict(layer.named_parameters()), layer.eps, axis, **kw)


def running_after(
    batches: Sequence[Tensor],
    momentum: Optional[float],
    axis: int = 1,
    *,
    kind: str = "bn",
    masks: Optional[Sequence[Optional[Tensor]]] = None,
    start: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """Running mean / var after training on ``batches`` (PyTorch convention; momentum None:
    cumulative average), from ``start`` (default zeros / ones), valid values only.

    ``kind='bn'``: mean and unbiased variance of all valid values of a channel (unchanged with
    fewer than 2). ``kind='in'``: torch.nn.InstanceNorm's average of per-sample estimates over
    the samples with at least 2 valid positions (unchanged if there is none).
    """
    c = batches[0].shape[axis]
    if start is None:
        rm, rv = torch.zeros(c, dtype=DOUBLE), torch.ones(c, dtype=DOUBLE)
    else:
        rm, rv = start[0].detach().to(DOUBLE), start[1].detach().to(DOUBLE)
    for i, b in enumerate(batches, 1):
        samples = packed(b.detach(), axis, None if masks is None else masks[i - 1])
        if kind == "bn":
            everything = torch.cat(samples, 1)
            if everything.shape[1] < 2:
                continue
            mean, var = everything.mean(1), everything.var(1, correction=1)
        else:
            voters = [s for s in samples if s.shape[1] >= 2]
            if not voters:
                continue
            mean = torch.stack([s.mean(1) for s in voters]).mean(0)
            var = torch.stack([s.var(1, correction=1) for s in voters]).mean(0)
        f = momentum if momentum is not None else 1.0 / i
        rm = (1 - f) * rm + f * mean
        rv = (1 - f) * rv + f * var
    return rm, rv


def pooled(
    batches: Sequence[Tensor],
    axis: int = 1,
    masks: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    kind: str = "bn",
) -> tuple[Tensor, Tensor]:
    """The population statistics ``recompute_stats`` must produce from every valid value of
    every batch: ``kind='bn'``: mean and unbiased variance per channel; ``kind='in'``: the
    average over all samples of each sample's mean and unbiased variance."""
    samples = [s for i, b in enumerate(batches) for s in packed(b.detach(), axis, None if masks is None else masks[i])]
    if kind == "in":
        return torch.stack([s.mean(1) for s in samples]).mean(0), torch.stack([s.var(1) for s in samples]).mean(0)
    values = torch.cat(samples, 1)
    return values.mean(1), values.var(1, correction=1)


def moments(x: Tensor, axis: int = 1) -> tuple[Tensor, Tensor]:
    """(N, C) mean and biased variance per sample and channel, two-pass."""
    v = _channels_first(x, axis)
    mean = v.mean(-1)
    return mean, ((v - mean[..., None]) ** 2).mean(-1)
