"""The mix: from per-(sample, channel) moments and importance weights to ``mu``, ``scale``
and ``shift``, and the running-average update.

A :class:`MixSpec` is everything about a normalization that is not a tensor. It is frozen
and compared whole: a kernel set serves a call only when it was written for that exact spec
type (see ``normkit.kernels``), so a new normalizer with its own fields never runs a kernel
that ignores them. :class:`MixSpec`'s mix takes importance *weights* ``(K,)``, however the
layer made them (sparsestmax for Sparse SN); :class:`SoftmaxMixSpec`'s takes the logits and
mixes with their softmax (SN), so that a fused kernel written for it computes the softmax in
the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from normkit._core.moments import Moments, expand_stat, merge_moments
from normkit._core.sources import source_code, source_moments
from normkit._core.weights import softmax_weights

__all__ = ["MixSpec", "RenormSpec", "SoftmaxMixSpec", "apply_affine", "mix", "renorm_correction", "spec_from_codes",
           "update_running"]


@dataclass(frozen=True)
class MixSpec:
    """A normalization without its tensors.

    Attributes:
        sources: parsed source names (see :func:`normkit._core.parse_sources`).
        eps: added to the mixed variance.
        batch_stats: True to take the tracked statistic from the batch (training); False to
            read it from the running averages (eval, frozen).
        running: which statistic has running averages: ``'bn'`` (per channel over the
            batch) or ``'in'`` (the average of per-sample estimates, as
            ``torch.nn.InstanceNorm*d``).
    """

    sources: tuple[str, ...]
    eps: float
    batch_stats: bool = True
    running: str = "bn"

    def __post_init__(self) -> None:
        if self.running not in ("bn", "in"):
            raise ValueError(f"running must be 'bn' or 'in', got {self.running!r}")
        self._facts()  # invalid sources raise here, at construction

    def _facts(self) -> tuple:
        """``(constant, tracked, codes)``, derived on first use and kept: the layers and the
        dispatcher read them on every call. Lazy, so that a subclass whose own
        ``__post_init__`` skips this one still works; ``codes`` follows a subclass's
        ``constant_sources``."""
        facts = self.__dict__.get("_derived")
        if facts is not None:
            return facts
        if self.batch_stats:
            constant = (False,) * len(self.sources)
            tracked = "bn" if "bn" in self.sources else (
                "in" if self.running == "in" and self.sources == ("in",) else None)
        else:
            in_from_running = self.running == "in" and "bn" not in self.sources
            constant = tuple(s == "bn" or (s == "in" and in_from_running) for s in self.sources)
            tracked = None
        object.__setattr__(self, "_derived", (constant, tracked, None))  # constant_sources may read it
        pairs = [source_code(s) for s in self.sources]
        mask = sum(1 << k for k, const in enumerate(self.constant_sources) if const)
        facts = (constant, tracked, (tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), mask))
        object.__setattr__(self, "_derived", facts)
        return facts

    @property
    def constant_sources(self) -> tuple[bool, ...]:
        """Per source: whether it is read from the running averages instead of the input."""
        return self._facts()[0]

    @property
    def reads_running(self) -> bool:
        return self.codes[2] != 0

    @property
    def needs_input_moments(self) -> bool:
        """False when every statistic comes from running averages (BN or IN in eval)."""
        return self.codes[2] != (1 << len(self.sources)) - 1

    @property
    def tracked(self) -> Optional[str]:
        """The statistic whose batch value moves the running averages: 'bn', 'in' or None."""
        return self._facts()[1]

    def mix(self, m_in: Moments, mean_weights: Optional[Tensor], var_weights: Optional[Tensor],
            weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor] = None,
            running_var: Optional[Tensor] = None, merge_batch: Optional[Callable[[Moments], Moments]] = None,
            ) -> tuple[Tensor, Tensor, Tensor, Optional[Moments]]:
        """This normalization's mix (see :func:`mix`); a spec with its own maths overrides it."""
        return mix(self, m_in, mean_weights, var_weights, weight, bias, running_mean, running_var, merge_batch)

    def update(self, tracked: Moments, running_mean: Tensor, running_var: Tensor, momentum: float) -> None:
        """Move the running statistics from ``tracked`` (see :func:`update_running`)."""
        update_running(tracked, running_mean, running_var, momentum, self.running)

    @property
    def codes(self) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """``(kinds, groups, constant_mask)``: this spec in the compiled mixer's terms."""
        return self._facts()[2]


@dataclass(frozen=True)
class SoftmaxMixSpec(MixSpec):
    """Switchable Normalization's mix: the ``mean_weights`` and ``var_weights`` it receives
    are logits, and the mix weights are their float64 softmaxes (:func:`softmax_weights`).
    Its own type, so only kernels written for logits serve it; its :attr:`codes` are those of
    the :class:`MixSpec` with the same fields. Needs two or more sources."""

    def __post_init__(self) -> None:
        if len(self.sources) < 2:
            raise ValueError(f"SoftmaxMixSpec mixes two or more sources, got {self.sources}")
        super().__post_init__()

    def mix(self, m_in: Moments, mean_weights: Optional[Tensor], var_weights: Optional[Tensor],
            weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor] = None,
            running_var: Optional[Tensor] = None, merge_batch: Optional[Callable[[Moments], Moments]] = None,
            ) -> tuple[Tensor, Tensor, Tensor, Optional[Moments]]:
        """:func:`mix` with ``mean_weights, var_weights = softmax(mean_logits), softmax(var_logits)``."""
        if mean_weights is None or var_weights is None:
            raise ValueError(f"mean and variance logits of shape ({len(self.sources)},) are required")
        mean_weights, var_weights = softmax_weights(mean_weights, var_weights)
        return mix(self, m_in, mean_weights, var_weights, weight, bias, running_mean, running_var, merge_batch)


@dataclass(frozen=True)
class RenormSpec(MixSpec):
    r"""Batch Renormalization in training (Ioffe, NeurIPS 2017): batch norm with the batch
    statistics, corrected towards the running ones by
    :math:`r = \mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_B / \sigma)` and
    :math:`d = \mathrm{clip}_{[-d_{max}, d_{max}]}((\mu_B - \mu) / \sigma)`, constants for
    autograd: ``y = gamma (r (x - mu_B) / sigma_B + d) + beta`` with ``sigma_B = sqrt(var_B +
    eps)`` (biased) and ``sigma = sqrt(running_var + eps)``. It reads the running statistics
    and then moves them (:meth:`update`, the paper's Algorithm 1). Its own type, so only
    kernels written for it serve it; its :attr:`codes` are batch norm's.

    Build it as ``RenormSpec(("bn",), eps, r_max=..., d_max=...)``.
    """

    r_max: float = 1.0
    d_max: float = 0.0

    def __post_init__(self) -> None:
        if self.sources != ("bn",) or not self.batch_stats or self.running != "bn":
            raise ValueError(f"RenormSpec is batch norm in training: sources ('bn',), batch_stats True, running "
                             f"'bn'; got {self.sources}, {self.batch_stats}, {self.running!r}")
        super().__post_init__()

    @property
    def reads_running(self) -> bool:
        return True  # r and d, though no source is a running statistic

    def mix(self, m_in: Moments, mean_weights: Optional[Tensor], var_weights: Optional[Tensor],
            weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor] = None,
            running_var: Optional[Tensor] = None, merge_batch: Optional[Callable[[Moments], Moments]] = None,
            correction: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor, Optional[Moments]]:
        """As :meth:`MixSpec.mix`; ``correction``: ``(r, d)`` already computed (a recomputation
        after the running statistics moved), else from ``running_mean`` and ``running_var``."""
        n, c = m_in.mean.shape
        dtype = m_in.mean.dtype
        batch = merge_moments(m_in, 0)
        if merge_batch is not None:
            batch = merge_batch(batch)
        if correction is None:
            if running_mean is None or running_var is None:
                raise ValueError("running_mean and running_var are required: Batch Renorm corrects towards them")
            correction = renorm_correction(batch, running_mean, running_var, self.eps, self.r_max, self.d_max)
        r, d = (t.to(dtype) for t in correction)
        g = weight.to(dtype) if weight is not None else None
        # the operations of batch norm's mix with the affine (gamma r, beta + gamma d), so that
        # r = 1, d = 0 gives batch norm's results bit for bit
        scale = torch.rsqrt(batch.var + self.eps).expand(n, c) * (r if g is None else g * r)
        shift = d if g is None else g * d
        if bias is not None:
            shift = shift + bias.to(dtype)
        return batch.mean.expand(n, c), scale, shift.reshape(c), batch

    def update(self, tracked: Moments, running_mean: Tensor, running_var: Tensor, momentum: float) -> None:
        """The paper's running update: ``mu += momentum (mu_B - mu)``, ``sigma += momentum
        (sigma_B - sigma)``, stored as ``running_var = max(sigma^2 - eps, 0)``, for channels
        with more than one value."""
        with torch.no_grad():
            dtype = running_mean.dtype
            seen = (tracked.count.expand_as(tracked.mean) > 1).reshape(-1)
            mean_b = tracked.mean.reshape(-1).to(dtype)
            sigma_b = (tracked.var.reshape(-1).to(dtype) + self.eps).sqrt()
            sigma = (running_var.clamp_min(0.0) + self.eps).sqrt()
            new_sigma = torch.where(seen, sigma.lerp(sigma_b, momentum), sigma)
            running_mean.copy_(torch.where(seen, running_mean.lerp(mean_b, momentum), running_mean))
            running_var.copy_((new_sigma * new_sigma - self.eps).clamp_min(0.0))


def renorm_correction(batch: Moments, running_mean: Tensor, running_var: Tensor, eps: float, r_max: float,
                      d_max: float) -> tuple[Tensor, Tensor]:
    """Batch Renorm's ``(r, d)``, ``(C,)`` constants in float64 (see :class:`RenormSpec`)."""
    with torch.no_grad():
        mean_b, var_b = batch.mean.detach().reshape(-1).double(), batch.var.detach().reshape(-1).double()
        sigma = (running_var.detach().double().clamp_min(0.0) + eps).sqrt()
        r = ((var_b + eps).sqrt() / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean_b - running_mean.detach().double()) / sigma).clamp(-d_max, d_max)
    return r, d


def _running_moments(count: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], c: int,
                     dtype: torch.dtype) -> Moments:
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when statistics come from running averages")
    return Moments(count, running_mean.to(dtype).reshape(1, c), running_var.to(dtype).reshape(1, c))


def mix(
    spec: MixSpec,
    m_in: Moments,
    mean_weights: Optional[Tensor],
    var_weights: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    merge_batch: Optional[Callable[[Moments], Moments]] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Moments]]:
    """``(mu, scale, shift, tracked)`` of one normalization.

    ``mu`` and ``scale`` are (N, C), ``shift`` is (C,), all in the moments' dtype;
    ``tracked`` is the batch statistic that moves the running averages (None when none
    does). ``merge_batch`` post-processes the batch statistics (the cross-process merge of
    synchronised layers). A pure function of small tensors: autograd differentiates it.
    """
    n, c = m_in.mean.shape
    dtype = m_in.mean.dtype
    tracked: Optional[Moments] = None
    batch: Optional[Moments] = None
    if "bn" in spec.sources:
        if spec.batch_stats:
            batch = merge_moments(m_in, 0)
            if merge_batch is not None:
                batch = merge_batch(batch)
            tracked = batch
        else:
            batch = _running_moments(m_in.count.new_ones(()), running_mean, running_var, c, dtype)
    elif spec.running == "in":
        if spec.batch_stats:
            tracked = m_in if spec.tracked == "in" else None
        elif spec.reads_running:
            m_in = _running_moments(m_in.count, running_mean, running_var, c, dtype)
    per_source = [source_moments(s, m_in, batch) for s in spec.sources]
    if len(per_source) == 1:
        mu, var = per_source[0].mean, per_source[0].var
    else:
        assert mean_weights is not None and var_weights is not None
        # Mixed in float64: the weights' gradient sums N*C products of statistics, which
        # cancel in float32 when the inputs have a large offset.
        wm, wv = mean_weights.double(), var_weights.double()
        mu, var = wm[0] * per_source[0].mean.double(), wv[0] * per_source[0].var.double()
        for k in range(1, len(per_source)):
            mu = mu + wm[k] * per_source[k].mean.double()
            var = var + wv[k] * per_source[k].var.double()
        mu, var = mu.to(dtype), var.to(dtype)
    # no clamp: mixed batch variances are never negative, and a negative or NaN running
    # variance gives NaN, as in torch
    scale = torch.rsqrt(var + spec.eps).expand(n, c)
    if weight is not None:
        scale = scale * weight.to(dtype)
    mu = mu.expand(n, c)
    shift = bias.to(dtype) if bias is not None else torch.zeros(c, dtype=dtype, device=mu.device)
    return mu, scale, shift, tracked


def update_running(tracked: Moments, running_mean: Tensor, running_var: Tensor, momentum: float,
                   running: str) -> None:
    """Move running statistics towards the batch's, with the unbiased variance.

    Channels that saw at most one value (no variance estimate, e.g. an all-padded batch)
    keep their running statistics. For ``running='in'`` (the average of per-sample
    estimates, as ``torch.nn.InstanceNorm*d``) only samples with more than one valid
    position vote.
    """
    with torch.no_grad():
        count, mean, var = tracked.count.expand_as(tracked.mean), tracked.mean, tracked.var
        unbiased = var * count / (count - 1).clamp_min(1.0)
        estimated = count > 1
        if running == "in":
            votes = estimated.sum(0)
            mean, unbiased = (torch.where(estimated, t, 0.0).sum(0) / votes.clamp_min(1) for t in (mean, unbiased))
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


_NAMES = {0: "in", 1: "ln", 2: "bn"}


def spec_from_codes(kinds: tuple[int, ...], groups: tuple[int, ...], constant_mask: int, eps: float,
                    renorm: Optional[Sequence[float]] = None, softmax: bool = False) -> MixSpec:
    """The :class:`MixSpec` whose :attr:`MixSpec.codes` are these (the inverse of ``codes``);
    with ``renorm = (r_max, d_max)`` the :class:`RenormSpec`, with ``softmax`` the
    :class:`SoftmaxMixSpec`."""
    if renorm:
        return RenormSpec(("bn",), eps, r_max=float(renorm[0]), d_max=float(renorm[1]))
    sources = tuple(_NAMES.get(k, f"gn{g}") for k, g in zip(kinds, groups))
    running = "in" if sources == ("in",) and constant_mask else "bn"
    return (SoftmaxMixSpec if softmax else MixSpec)(sources, eps, batch_stats=constant_mask == 0, running=running)
