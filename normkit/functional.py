"""Functional normalization ops, and the one dispatcher that decides how each call runs.

Every op follows the computation reuse of Switchable Normalization (Luo et al., ICLR 2019):
per-(sample, channel) moments once (float32 statistics, float64 for float64 input, two-pass
variances), every other statistic (LN, BN, GN) an exact Chan merge of them, then the mix
(:class:`normkit._core.MixSpec` and importance weights) and ``y = (x - mu) * scale + shift``.

Conventions (deliberate, and different from Keras and the official SN code):

* Normalisation uses the biased variance, so one-hot SN weights reproduce IN / LN / BN
  exactly and BN matches ``torch.nn.BatchNorm*d``. Running variances are updated with the
  unbiased estimate, as PyTorch does.
* ``momentum`` is PyTorch's: the weight of the *new* batch (default 0.1). Keras' and the
  official SN code's 0.9 / 0.99 / 0.997 are the weight of the *old* value.

How a call runs (:func:`normalize`, the only place these rules live):

1. An empty input, a ``torch.func`` transform or forward-mode AD active, or the
   ``'reference'`` backend: the **reference path**, plain autograd over ATen ops (these
   transforms have rules for ATen ops only). So is a ``mask`` when the backend's kernel set
   does not declare ``masks`` (only the CPU set does).
2. Otherwise the backend's kernel set for the input's device (:func:`normkit.kernels.select`):
   when it runs this exact spec type natively, takes this input's layout, and neither
   ``mask`` nor ``process_group`` is given, the fused **layer operator**
   ``normkit::layer_forward`` (also under ``torch.compile``, FakeTensor and ``torch.export``,
   where it is one node of the graph);
3. else, in eager mode on real tensors, the **generic fused path**: the set's four passes
   around the Python mix (:mod:`normkit.kernels._generic`); with ``process_group`` the mix
   merges the batch statistics across processes (one collective forward, one backward);
   with ``mask`` the passes run over the valid positions only (masked passes). A masked
   call of a spec the set runs natively (``masked_layer``) takes the masked passes around
   the C mixer instead of the Python mix (each sample weighted by its valid count);
4. else the reference path (under ``torch.compile`` Inductor fuses it; masked calls under
   compile or FakeTensor land here too).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch._subclasses.fake_tensor import FakeTensor

from normkit import kernels
from normkit._core import (
    InputError,
    MixSpec,
    SoftmaxMixSpec,
    Moments,
    RenormSpec,
    apply_affine,
    broadcast_mask,
    check_eps,
    check_float_input,
    check_momentum,
    check_per_channel,
    check_weights,
    mask_for,
    merge_moments,
    moments,
    normalize_axis,
    parse_sources,
    sparsestmax_weights,
)
from normkit.distributed import all_merge_moments
from normkit.kernels._generic import generic_normalize

__all__ = [
    "Moments",
    "moments",
    "merge_moments",
    "parse_sources",
    "normalize",
    "run",
    "switch_norm",
    "sparse_switch_norm",
    "batch_norm",
    "batch_renorm",
    "renorm_train",
    "group_norm",
    "layer_norm",
    "instance_norm",
]


def _reference_only(x: Tensor, compiling: bool) -> bool:
    """Rule 1 of the module docstring: what only the reference path computes."""
    if x.numel() == 0:
        return True
    # ONNX has no normkit operator. Both exporters trace (TorchScript's tracer, or torch.export
    # while compiling), and the check itself costs as much as a small layer's kernel.
    if (compiling or torch.jit.is_tracing()) and torch.onnx.is_in_onnx_export():
        return True
    # torch.func transforms and forward AD have rules for ATen ops only (neither is active
    # while torch.compile traces)
    return not compiling and (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0)


def normalize(
    x: Tensor,
    spec: MixSpec,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    mean_weights: Optional[Tensor] = None,
    var_weights: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    channel_axis: int = 1,
    mask: Optional[Tensor] = None,
    process_group: Any = None,
) -> Tensor:
    """Run the normalization ``spec`` on ``x`` (arguments already validated, ``channel_axis``
    non-negative) and move the running statistics when the spec tracks them."""
    tracked: Optional[Moments]
    compiling = torch.compiler.is_compiling()
    chosen = None
    if not _reference_only(x, compiling):
        chosen = kernels.select(x)
        if chosen is not None and (chosen.supports(x, channel_axis) is not None
                                   or (mask is not None and not chosen.masks)):
            chosen = None  # (a set that does not declare masks never receives one)
    if chosen is not None and mask is None and process_group is None and chosen.runs_layer(spec):
        y, tracked = chosen.layer(
            x, spec, weight, bias, mean_weights, var_weights, running_mean, running_var, momentum, channel_axis
        )
    elif chosen is not None and mask is not None and process_group is None and chosen.masked_layer is not None \
            and chosen.runs_layer(spec) and not compiling and not isinstance(x, FakeTensor):
        y, tracked = chosen.masked_layer(x, spec, weight, bias, mean_weights, var_weights, running_mean, running_var,
                                         momentum, channel_axis, mask)
    elif chosen is not None and not compiling and not isinstance(x, FakeTensor):
        reads = (running_mean, running_var) if spec.reads_running else (None, None)
        if spec.reads_running and spec.tracked is not None and running_mean is not None:
            # read, then moved below: a double backward's recomputation must see the values read
            reads = (running_mean.clone(), running_var.clone())
        merge_batch = None if process_group is None else functools.partial(all_merge_moments,
                                                                            process_group=process_group)
        mix_fn = functools.partial(_mix_reading, spec, *reads, merge_batch)
        y, tracked = generic_normalize(chosen, x, channel_axis, mix_fn, (mean_weights, var_weights, weight, bias),
                                       mask)
    else:
        y, tracked = _reference(x, spec, weight, bias, mean_weights, var_weights, running_mean, running_var,
                                channel_axis, mask, process_group)
    # an empty input alone moves no statistic (skip the in-place update, which vmap refuses);
    # synced, it moves them to the other processes' statistics
    if tracked is not None and running_mean is not None and running_var is not None and (
            x.numel() or process_group is not None):
        spec.update(tracked, running_mean, running_var, momentum)
    return y


def _mix_reading(spec: MixSpec, running_mean, running_var, merge_batch, m_in: Moments, mean_weights, var_weights,
                 weight, bias):
    return spec.mix(m_in, mean_weights, var_weights, weight, bias, running_mean, running_var, merge_batch)


def _reference(x, spec, weight, bias, mean_weights, var_weights, running_mean, running_var, channel_axis, mask,
               process_group) -> tuple[Tensor, Optional[Moments]]:
    merge_batch = None if process_group is None else functools.partial(all_merge_moments, process_group=process_group)
    m_in = moments(x, channel_axis, mask)
    mu, scale, shift, tracked = spec.mix(m_in, mean_weights, var_weights, weight, bias, running_mean, running_var,
                                         merge_batch)
    if mask is None:
        return apply_affine(x, mu, scale, shift, channel_axis), tracked
    # Zero padded inputs before the affine too: the backward of (x - mu) * scale sums
    # dy * (x - mu), and 0 * NaN there would poison the statistics' gradients.
    valid = mask_for(x, mask, channel_axis)
    y = apply_affine(torch.where(valid, x, 0.0), mu, scale, shift, channel_axis)
    return torch.where(valid, y, 0.0), tracked


def _channel_axis(x: Tensor, channel_axis: int) -> int:
    """Check a functional op's input and return its non-negative channel axis."""
    check_float_input(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch and a channel dim, got a {x.dim()}-D input of shape {tuple(x.shape)}")
    axis = normalize_axis(channel_axis, x.dim())
    if axis == 0:
        raise ValueError(f"channel_axis must not be the batch axis 0, got channel_axis={channel_axis}")
    return axis


def _switchable(x: Tensor, running_mean, running_var, weight, bias, mean_logits, var_logits, sources, training: bool,
                momentum: float, eps: float, channel_axis: int, mask, process_group, policy) -> Tensor:
    """The functional SN family: ``policy(mean_logits, var_logits) -> (mean_weights,
    var_weights)`` (sparsestmax for SSN; none for one source), or ``policy=None`` for SN's
    softmax, which the mix computes from the logits (:class:`SoftmaxMixSpec`)."""
    axis = _channel_axis(x, channel_axis)
    sources = parse_sources(sources, x.shape[axis])
    check_eps(eps)
    check_momentum(momentum)
    mean_weights = var_weights = None
    spec_type = MixSpec
    if len(sources) > 1:
        check_weights(mean_logits, "mean_logits", sources, x.device)
        check_weights(var_logits, "var_logits", sources, x.device)
        if policy is None:
            spec_type, mean_weights, var_weights = SoftmaxMixSpec, mean_logits, var_logits
        else:
            mean_weights, var_weights = policy(mean_logits, var_logits)
    has_bn = "bn" in sources
    use_batch = training or running_mean is None
    if has_bn and not use_batch and running_var is None:
        raise ValueError("running_var is required with running_mean when not training")
    return run(
        x, spec_type(sources, eps, use_batch, "bn"), weight, bias, mean_weights, var_weights,
        running_mean if has_bn else None, running_var if has_bn else None, momentum, axis, mask,
        process_group if training and has_bn else None,
    )


def run(
    x: Tensor,
    spec: MixSpec,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean_weights: Optional[Tensor],
    var_weights: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    channel_axis: int,
    mask: Optional[Tensor] = None,
    process_group: Any = None,
) -> Tensor:
    """Validate every per-channel tensor against ``x`` (on every backend), then
    :func:`normalize`. ``x`` is a float tensor and ``channel_axis`` is non-negative."""
    check_per_channel(x, x.shape[channel_axis], weight=weight, bias=bias, running_mean=running_mean,
                      running_var=running_var)
    if spec.reads_running and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when statistics come from running averages")
    return normalize(x, spec, weight, bias, mean_weights, var_weights, running_mean, running_var, momentum,
                     channel_axis, mask, process_group)


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
    return _switchable(x, running_mean, running_var, weight, bias, mean_logits, var_logits, sources, training,
                       momentum, eps, channel_axis, mask, process_group, None)


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
    axis = _channel_axis(x, channel_axis)
    check_eps(eps)
    check_momentum(momentum)
    use_batch = use_input_stats or running_mean is None
    if not use_batch and running_var is None:
        raise ValueError("running_var is required with running_mean when use_input_stats is False")
    return run(x, MixSpec(("in",), eps, use_batch, "in"), weight, bias, None, None, running_mean, running_var,
               momentum, axis, mask)


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
    axis = _channel_axis(x, channel_axis)
    c = x.shape[axis]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise InputError(f"num_groups must divide the number of channels {c}, got {num_groups}")
    check_eps(eps)
    return run(x, MixSpec((f"gn{num_groups}",), eps), weight, bias, None, None, None, None, 0.0, axis, mask)


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
    check_float_input(x, "x")
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(
            f"layer_norm expects an input whose trailing dims are {normalized_shape}, "
            f"got shape {tuple(x.shape)}"
        )
    check_eps(eps)
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != normalized_shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have the normalized shape {normalized_shape}, got {got}")
        if t is not None:
            check_float_input(t, name)
    lead = x.shape[: x.dim() - k]
    rows = x.reshape(-1, 1, math.prod(normalized_shape))
    valid_rows = None if mask is None else broadcast_mask(mask, lead, x.device, "the input's leading dims")
    row_mask = None if valid_rows is None else valid_rows.reshape(-1, 1)
    y = normalize(rows, MixSpec(("in",), eps, True, "in"), channel_axis=1, mask=row_mask).reshape(x.shape)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    if row_mask is not None:
        y = torch.where(valid_rows.reshape(*lead, *([1] * k)), y, 0.0)
    return y.to(x.dtype)  # float32 parameters must not promote a half / bfloat16 output (torch's rule)


# ---- Sparse Switchable Normalization and Batch Renormalization ------------------------------

def sparse_switch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean_logits: Optional[Tensor],
    var_logits: Optional[Tensor],
    radius: float = 0.0,
    sources: Sequence[str] = ("in", "ln", "bn"),
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    channel_axis: int = 1,
    mask: Optional[Tensor] = None,
    process_group: object = None,
) -> Tensor:
    r"""Sparse Switchable Normalization (Shao, Luo et al., CVPR 2019): :func:`switch_norm`
    with importance weights :math:`w = \mathrm{sparsestmax}(\text{mean\_logits}; r)`,
    :math:`w' = \mathrm{sparsestmax}(\text{var\_logits}; r)` instead of softmaxes.

    ``radius`` is :math:`r \in [0, \sqrt{1 - 1/K}]` (0: sparsemax; the maximum: one-hot). The
    other arguments are those of :func:`switch_norm`.
    """
    return _switchable(x, running_mean, running_var, weight, bias, mean_logits, var_logits, sources, training,
                       momentum, eps, channel_axis, mask, process_group,
                       functools.partial(sparsestmax_weights, radius=radius))


_RENORM_SPECS: dict[tuple[float, float, float], RenormSpec] = {}


def _renorm_spec(eps: float, r_max: float, d_max: float) -> RenormSpec:
    # built once per bounds (a spec costs more to build than a small layer's kernel)
    spec = _RENORM_SPECS.get((eps, r_max, d_max))
    if spec is None:
        spec = RenormSpec(("bn",), eps, r_max=r_max, d_max=d_max)
        if len(_RENORM_SPECS) < 4096:
            _RENORM_SPECS[(eps, r_max, d_max)] = spec
    return spec


def _check_clip(r_max: float, d_max: float) -> None:
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not 1.0 <= r_max < math.inf:
        raise ValueError(f"r_max must be a finite number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
    if isinstance(d_max, bool) or not isinstance(d_max, (int, float)) or not 0.0 <= d_max < math.inf:
        raise ValueError(f"d_max must be a finite number >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}")


def renorm_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    r_max: float,
    d_max: float,
    momentum: float,
    eps: float,
    channel_axis: int,
    mask: Optional[Tensor] = None,
    process_group: Any = None,
) -> Tensor:
    r"""One Batch Renormalization training call (arguments validated, ``channel_axis``
    non-negative): the spec :class:`normkit._core.RenormSpec`, whose fused kernel computes
    ``r`` and ``d`` between the moments and the apply (one read of ``x`` forward, as batch
    norm), then the paper's running update.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max,
    d_max)`` with ``sigma_B = sqrt(var_B + eps)`` (biased batch variance) and ``sigma =
    sqrt(running_var + eps)``; both are constants for autograd. With ``r_max = 1, d_max = 0``
    the output and gradients are batch norm's exactly. The running statistics then move as
    in Ioffe (2017), Algorithm 1: ``mu += momentum * (mu_B - mu)``, ``sigma += momentum *
    (sigma_B - sigma)`` (``running_var = sigma^2 - eps``), for channels with more than one
    valid value.
    """
    return run(x, _renorm_spec(float(eps), float(r_max), float(d_max)), weight, bias, None, None, running_mean,
               running_var, momentum, channel_axis, mask, process_group)


def batch_renorm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.01,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    *,
    channel_axis: int = 1,
    mask: Optional[Tensor] = None,
    process_group: object = None,
) -> Tensor:
    r"""Batch Renormalization (Ioffe, NeurIPS 2017).

    .. math::
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta,\quad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\!\left(\frac{\sigma_B}{\sigma}\right),\quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\!\left(\frac{\mu_B - \mu}{\sigma}\right)

    in training (``r``, ``d`` constants in backward; :math:`\mu, \sigma` the running statistics,
    which then move towards the batch's with ``momentum``, see :func:`renorm_train`); in eval
    :math:`y = \gamma (x - \mu) / \sigma + \beta`, batch norm with the running statistics.
    ``running_mean=None``: no statistics to renormalise against, plain batch norm with batch
    statistics. ``momentum`` is the weight of the new batch (Keras' ``renorm_momentum=0.99``
    is 0.01 here). Other arguments as :func:`batch_norm`.
    """
    axis = _channel_axis(x, channel_axis)
    check_eps(eps)
    check_momentum(momentum)
    _check_clip(r_max, d_max)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None for batch statistics)")
    if not training or running_mean is None:
        return batch_norm(x, running_mean, running_var, weight, bias, training or running_mean is None, momentum,
                          eps, channel_axis=axis, mask=mask, process_group=process_group)
    return renorm_train(x, weight, bias, running_mean, running_var, float(r_max), float(d_max), momentum, eps, axis,
                        mask, process_group)
