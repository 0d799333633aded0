"""Functional normalization ops: the maths behind every normkit layer.

Every op here follows one recipe, the computation reuse of Switchable Normalization
(Luo et al., ICLR 2019):

1. :func:`moments` computes the per-(sample, channel) count, mean and *biased* variance of
   ``x`` once (the "IN statistics"), in float32 whatever the input dtype (float64 stays
   float64), with a two-pass scheme that does not cancel when ``|mean| >> std``.
2. Every other statistic (LN, BN, GN) is an exact Chan merge of those moments, so no
   source reads ``x`` again. BN statistics can be merged across processes.
3. The sources are mixed (softmax importance weights for SN), giving a per-(n, c) mean
   ``mu`` and ``scale = gamma / sqrt(var + eps)``; then ``y = (x - mu) * scale + beta``.

Steps 1 and 3 touch the full tensor and run on a fused kernel when one is available
(:mod:`normkit._fused`); step 2 is an O(N*C) graph of plain torch ops that autograd
differentiates, whichever kernel runs the big passes.

Conventions (deliberate, and different from Keras and the official SN code):

* Normalisation uses the biased variance, so one-hot SN weights reproduce IN / LN / BN
  exactly and BN matches ``torch.nn.BatchNorm*d``. Running variances are updated with the
  unbiased estimate, as PyTorch does.
* ``momentum`` is PyTorch's: the weight of the *new* batch (default 0.1). Keras' and the
  official SN code's 0.9 / 0.99 / 0.997 are the weight of the *old* value.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "moments",
    "merge_moments",
    "parse_sources",
    "switch_norm",
    "batch_norm",
    "group_norm",
    "layer_norm",
    "instance_norm",
]

_GN_PATTERN = re.compile(r"^gn(\d+)$")
VALID_SOURCES_TEXT = "'in', 'ln', 'bn' or 'gnG' (group norm with G groups, e.g. 'gn8')"


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


def parse_sources(sources: Sequence[str] | str, num_features: Optional[int] = None) -> tuple[str, ...]:
    """Validate a tuple of statistic sources for :func:`switch_norm`."""
    if isinstance(sources, str):
        sources = (sources,)
    sources = tuple(s.lower() for s in sources)
    if not sources:
        raise ValueError(f"sources must name at least one of {VALID_SOURCES_TEXT}, got an empty sequence")
    if len(set(sources)) != len(sources):
        raise ValueError(f"sources must not repeat a name, got {sources}")
    for s in sources:
        gn = _GN_PATTERN.match(s)
        if s in ("in", "ln", "bn"):
            continue
        if gn is None:
            raise ValueError(f"unknown normalizer source {s!r}; valid sources are {VALID_SOURCES_TEXT}")
        groups = int(gn.group(1))
        if groups < 1 or (num_features is not None and num_features % groups):
            raise ValueError(
                f"source {s!r} needs a group count that divides num_features={num_features}, got {groups}"
            )
    return sources


def _source_moments(
    source: str,
    m_in: Moments,
    batch: Optional[Moments],
) -> Moments:
    """The statistics of one source, derived from the IN moments (no pass over x)."""
    if source == "in":
        return m_in
    if source == "ln":
        return merge_moments(m_in, 1)
    if source == "bn":
        assert batch is not None
        return batch
    groups = int(source[2:])
    n, c = m_in.mean.shape
    grouped = Moments(
        m_in.count.reshape(n, 1, 1),
        m_in.mean.reshape(n, groups, c // groups),
        m_in.var.reshape(n, groups, c // groups),
    )
    g = merge_moments(grouped, 2)
    return Moments(
        g.count.reshape(n, groups)[:, :1],
        g.mean.expand(n, groups, c // groups).reshape(n, c),
        g.var.expand(n, groups, c // groups).reshape(n, c),
    )


class Mixer(NamedTuple):
    """The O(N*C) part of a normalization: from IN moments to ``mu``, ``scale``, ``shift``.

    ``__call__`` is a pure function of small tensors, so a fused kernel can run the two
    full-size passes and let autograd differentiate this part alone.
    """

    sources: tuple[str, ...]
    eps: float
    use_batch_stats: bool
    running_source: str
    process_group: object

    @property
    def needs_input_moments(self) -> bool:
        """False when every statistic comes from running averages (BN or IN in eval)."""
        if self.use_batch_stats:
            return True
        frozen = "bn" if "bn" in self.sources else self.running_source
        return any(s != frozen for s in self.sources)

    def batch_moments(self, m_in: Moments) -> Moments:
        """Statistics over the batch (the BN source), merged across ranks when asked."""
        merged = merge_moments(m_in, 0)
        if self.process_group is not None:
            from normkit.distributed import all_merge_moments

            merged = all_merge_moments(merged, self.process_group)
        return merged

    def __call__(
        self,
        m_in: Moments,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        mean_logits: Optional[Tensor],
        var_logits: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Moments]]:
        """Return ``(mu, scale, shift, tracked)``: ``mu`` and ``scale`` of shape (N, C),
        ``shift`` of shape (C,), and the batch statistics of the running source (or None)."""
        n, c = m_in.mean.shape
        dtype = m_in.mean.dtype
        tracked: Optional[Moments] = None
        batch: Optional[Moments] = None
        if "bn" in self.sources:
            if self.use_batch_stats:
                batch = self.batch_moments(m_in)
                tracked = batch
            else:
                assert running_mean is not None and running_var is not None
                batch = Moments(
                    m_in.count.new_ones(()),
                    running_mean.to(dtype).reshape(1, c),
                    running_var.to(dtype).reshape(1, c),
                )
        elif self.running_source == "in":
            if self.use_batch_stats:
                tracked = m_in
            else:
                assert running_mean is not None and running_var is not None
                m_in = Moments(m_in.count, running_mean.to(dtype).reshape(1, c), running_var.to(dtype).reshape(1, c))
        per_source = [_source_moments(s, m_in, batch) for s in self.sources]
        if len(per_source) == 1:
            mu, var = per_source[0].mean, per_source[0].var
        else:
            assert mean_logits is not None and var_logits is not None
            wm = torch.softmax(mean_logits.to(dtype), 0)
            wv = torch.softmax(var_logits.to(dtype), 0)
            mu, var = wm[0] * per_source[0].mean, wv[0] * per_source[0].var
            for k in range(1, len(per_source)):
                mu = mu + wm[k] * per_source[k].mean
                var = var + wv[k] * per_source[k].var
        scale = torch.rsqrt(var.clamp_min(0.0) + self.eps).expand(n, c)
        if weight is not None:
            scale = scale * weight.to(dtype)
        mu = mu.expand(n, c)
        shift = bias.to(dtype) if bias is not None else torch.zeros(c, dtype=dtype, device=mu.device)
        return mu, scale, shift, tracked


def _update_running(
    tracked: Moments,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    running_source: str,
) -> None:
    """Move running statistics towards the batch's, with the unbiased variance.

    Channels that saw at most one value (no variance estimate, e.g. an all-padded batch)
    keep their running statistics. For the IN source (the average of per-sample estimates,
    as ``torch.nn.InstanceNorm*d``) only samples with more than one valid position vote.
    """
    with torch.no_grad():
        count, mean, var = tracked.count.expand_as(tracked.mean), tracked.mean, tracked.var
        unbiased = var * count / (count - 1).clamp_min(1.0)
        estimated = count > 1
        if running_source == "in":
            votes = estimated.sum(0)
            mean, unbiased = (
                torch.where(estimated, t, 0.0).sum(0) / votes.clamp_min(1) for t in (mean, unbiased)
            )
            estimated = votes > 0
        ok = estimated.reshape(-1)
        new_mean = torch.where(ok, mean.reshape(-1), running_mean.to(mean.dtype))
        new_var = torch.where(ok, unbiased.reshape(-1), running_var.to(mean.dtype))
        running_mean.lerp_(new_mean.to(running_mean.dtype), momentum)
        running_var.lerp_(new_var.to(running_var.dtype), momentum)


def apply_affine(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor, channel_axis: int) -> Tensor:
    """``(x - mu) * scale + shift`` in the statistics dtype, returned in x's dtype.

    Subtracting first keeps full precision for inputs with a large offset, where
    ``x * scale + (shift - mu * scale)`` would cancel.
    """
    xs = x.to(mu.dtype)
    ndim = x.dim()
    shift_shape = [1] * ndim
    shift_shape[channel_axis] = -1
    y = (xs - expand_stat(mu, ndim, channel_axis)) * expand_stat(scale, ndim, channel_axis)
    return (y + shift.reshape(shift_shape)).to(x.dtype)


def normalize(
    x: Tensor,
    mixer: Mixer,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    mean_logits: Optional[Tensor] = None,
    var_logits: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    channel_axis: int = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Run a normalization described by ``mixer``; update running stats when it tracks them."""
    channel_axis = normalize_axis(channel_axis, x.dim())
    small = (weight, bias, mean_logits, var_logits, running_mean, running_var)
    from normkit import _fused

    kernel = None if mixer.process_group is not None else _fused.select_kernels(x, channel_axis, mask)
    if kernel is not None:
        y, tracked = _fused.fused_normalize(kernel, x, channel_axis, mixer, small, momentum)
    else:
        m_in = moments(x, channel_axis, mask)
        mu, scale, shift, tracked = mixer(m_in, *small)
        if mask is None:
            y = apply_affine(x, mu, scale, shift, channel_axis)
        else:
            # Zero padded inputs before the affine too: the backward of (x - mu) * scale
            # sums dy * (x - mu), and 0 * NaN there would poison the statistics' gradients.
            valid = mask_for(x, mask, channel_axis)
            y = apply_affine(torch.where(valid, x, 0.0), mu, scale, shift, channel_axis)
            y = torch.where(valid, y, 0.0)
    if tracked is not None and running_mean is not None and running_var is not None:
        _update_running(tracked, running_mean, running_var, momentum, mixer.running_source)
    return y


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (PyTorch convention: the weight of the new batch), got {momentum}"
        )


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _check_logits(logits: Optional[Tensor], name: str, sources: tuple[str, ...]) -> None:
    if len(sources) > 1 and (logits is None or logits.shape != (len(sources),)):
        got = None if logits is None else tuple(logits.shape)
        raise ValueError(f"{name} must have shape ({len(sources)},), one entry per source {sources}, got {got}")


def switch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean_logits: Optional[Tensor],
    var_logits: Optional[Tensor],
    sources: Sequence[str] = ("in", "ln", "bn"),
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    channel_axis: int = 1,
    mask: Optional[Tensor] = None,
    process_group: object = None,
) -> Tensor:
    r"""Switchable Normalization.

    .. math::
        y = \gamma \frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma^2_k + \epsilon}} + \beta,
        \quad w = \mathrm{softmax}(\text{mean\_logits}),\ w' = \mathrm{softmax}(\text{var\_logits})

    Args:
        x: input ``(N, C, *)`` (channels at ``channel_axis``).
        running_mean, running_var: ``(C,)`` population statistics of the BN source, used when
            ``training`` is False and updated in place when it is True. ``None``: batch
            statistics always.
        weight, bias: ``(C,)`` affine parameters or ``None``.
        mean_logits, var_logits: ``(K,)`` logits of the K sources (ignored for K = 1).
        sources: names from ``'in'``, ``'ln'``, ``'bn'``, ``'gnG'``. Default ``('in', 'ln', 'bn')``.
        training: use batch statistics for the BN source and update the running ones.
        momentum: weight of the new batch in the running average (PyTorch convention).
        eps: added to the variance. Default 1e-5.
        channel_axis: the feature axis. Default 1.
        mask: bool, ``x``'s shape without its channel axis (same rank, sizes 1 broadcast;
            e.g. ``(N, L)`` for ``(N, C, L)`` or channels-last ``(N, L, C)``), True = valid.
            Every source's statistics and the running averages see valid positions only
            (see :func:`moments`); padded outputs are 0 and pass no gradient, so NaN / inf
            there never leak. A sample with no valid position gives no NaN: its IN / LN / GN
            statistics are mean 0, variance 0; a batch with at most one valid value per
            channel leaves the running averages unchanged.
        process_group: merge BN statistics across this ``torch.distributed`` group in training.
    """
    sources = parse_sources(sources, x.shape[normalize_axis(channel_axis, x.dim())])
    _check_eps(eps)
    _check_momentum(momentum)
    _check_logits(mean_logits, "mean_logits", sources)
    _check_logits(var_logits, "var_logits", sources)
    use_batch = training or running_mean is None
    if "bn" in sources and not use_batch and running_var is None:
        raise ValueError("running_var is required with running_mean when not training")
    mixer = Mixer(sources, eps, use_batch, "bn", process_group if training else None)
    return normalize(
        x, mixer, weight, bias, mean_logits, var_logits,
        running_mean if "bn" in sources else None,
        running_var if "bn" in sources else None,
        momentum, channel_axis, mask,
    )


def batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    channel_axis: int = 1,
    mask: Optional[Tensor] = None,
    process_group: object = None,
) -> Tensor:
    r"""Batch Normalization, same arguments and results as ``torch.nn.functional.batch_norm``,
    plus ``channel_axis``, ``mask`` and ``process_group`` (see :func:`switch_norm`).

    .. math:: y = \gamma \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta
    """
    return switch_norm(
        x, running_mean, running_var, weight, bias, None, None, ("bn",), training, momentum, eps,
        channel_axis=channel_axis, mask=mask, process_group=process_group,
    )


def instance_norm(
    x: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    channel_axis: int = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Instance Normalization, as ``torch.nn.functional.instance_norm`` (running statistics
    are averages of the per-sample estimates), plus ``channel_axis`` and ``mask``."""
    _check_eps(eps)
    _check_momentum(momentum)
    use_batch = use_input_stats or running_mean is None
    mixer = Mixer(("in",), eps, use_batch, "in", None)
    return normalize(
        x, mixer, weight, bias, None, None, running_mean, running_var, momentum, channel_axis, mask
    )


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    channel_axis: int = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Group Normalization, as ``torch.nn.functional.group_norm``, plus ``channel_axis`` and
    ``mask``. ``num_groups`` must divide the channel count."""
    c = x.shape[normalize_axis(channel_axis, x.dim())]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups must divide the number of channels {c}, got {num_groups}")
    _check_eps(eps)
    mixer = Mixer((f"gn{num_groups}",), eps, True, "bn", None)
    return normalize(x, mixer, weight, bias, channel_axis=channel_axis, mask=mask)


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Layer Normalization over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.layer_norm``.

    ``mask`` (bool, the shape of the leading dims ``x.shape[:-len(normalized_shape)]``,
    sizes 1 broadcast, e.g. ``(N, L)`` for ``(N, L, D)``) marks valid rows: padded rows
    neither enter any statistic nor receive gradient, and their outputs are 0 (not
    ``beta``). Rows are independent, so a valid row's output is the same as without a mask,
    and NaN / inf in padded rows never leak. For an SN-style layer norm over (C, H, W)
    with per-channel affine, use :func:`group_norm` with one group.
    """
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(
            f"layer_norm expects an input whose trailing dims are {normalized_shape}, "
            f"got shape {tuple(x.shape)}"
        )
    _check_eps(eps)
    lead = x.shape[: x.dim() - k]
    rows = x.reshape(-1, 1, math.prod(normalized_shape))
    valid_rows = None if mask is None else broadcast_mask(mask, lead, x.device, "the input's leading dims")
    row_mask = None if valid_rows is None else valid_rows.reshape(-1, 1)
    y = normalize(rows, Mixer(("in",), eps, True, "in", None), channel_axis=1, mask=row_mask).reshape(x.shape)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    if row_mask is not None:
        y = torch.where(valid_rows.reshape(*lead, *([1] * k)), y, 0.0)
    return y
