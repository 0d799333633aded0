r"""Sparse Switchable Normalization.

Shao, Zhang, Luo, Ren, Lin, Wang, Li, "SSN: Learning Sparse Switchable Normalization via
SparsestMax", CVPR 2019 (arXiv:1903.03793). SwitchNorm whose importance weights are the
*sparsestmax* of the logits instead of their softmax: the projection onto the simplex
outside a ball of radius ``r`` around its centre. As ``r`` grows over training to
:math:`\sqrt{1 - 1/K}` every layer ends with exactly one normalizer, so there is no mixing
cost at inference and :func:`normkit.harden` replaces it by that normalizer exactly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from normkit._core import MixSpec
from normkit._core.sparsestmax import layer_weights, max_radius
from normkit.nn.switchnorm import _SwitchNorm

__all__ = ["SparseSwitchNorm1d", "SparseSwitchNorm2d", "SparseSwitchNorm3d"]

class _SparseSwitchNorm(_SwitchNorm):
    r"""Applies Sparse Switchable Normalization over the channel axis.

    .. math::
        y = \gamma \frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma_k^2 + \epsilon}} + \beta,
        \qquad w = \mathrm{sparsestmax}(\text{mean\_logits}; r),\quad
        w' = \mathrm{sparsestmax}(\text{var\_logits}; r)

    with the statistics :math:`(\mu_k, \sigma^2_k)` of :class:`normkit.SwitchNorm2d` and

    .. math:: \mathrm{sparsestmax}(z; r) = \arg\min_{p \ge 0,\ \mathbf 1^\top p = 1,\
              \lVert p - \mathbf 1/K \rVert \ge r} \lVert p - z \rVert^2

    (:func:`normkit._core.sparsestmax.sparsestmax`): ``r = 0`` is sparsemax (already sparse),
    and at the largest radius :math:`r_c = \sqrt{1 - 1/K}` the weights are one-hot on the
    largest logit (the first one on a tie; with equal logits, the first source).

    **Radius schedule.** The radius is the buffer ``radius`` (saved in the state dict) and is
    driven by the buffer ``radius_step``, the number of training steps taken: every forward in
    training mode with gradients enabled (outside ``torch.func`` transforms) is one step: the
    radius is set from the schedule at ``t``, the steps taken before it, then ``radius_step
    += 1``. The first step is therefore sparsemax: the logits start equal, and equal logits
    with ``r > 0`` sit at the tie point, where the weights are locally constant (zero
    gradient) and the logits would never move. (A fixed ``radius > 0`` from the start has
    that problem: break the tie first.) Forwards in eval or under ``torch.no_grad()`` (validation,
    :func:`normkit.recompute_stats`) do not move it, and a model loaded from a checkpoint
    continues the same schedule. The schedule, by priority:

    * ``radius_schedule(step) -> r``, a callable (clipped to :math:`r_c`; not saved: pass the
      same one when you rebuild the layer);
    * ``radius_steps = T`` (default 10000): the paper's linear growth, :math:`r = \min(r_c,
      t / T)` with ``t`` counted from 0 (the official code's ``r = t / T`` with ``T`` the total
      number of iterations: a layer of 3 sources is one-hot from step :math:`0.816\,T` on, 4
      sources from :math:`0.866\,T`);
    * ``radius_steps=None`` and no callable: the radius stays where it is (``radius`` at
      construction, then whatever :meth:`set_radius` sets).

    Everything else (sources, running statistics of the BN source, masks, ``axis``,
    ``frozen``, ``process_group``, degenerate shapes, momentum convention) is as in
    :class:`normkit.SwitchNorm2d`. The weights are computed in float64.

    Args:
        num_features, eps, momentum, sources, affine, last_gamma, track_running_stats, device,
            dtype, bias, center, scale, axis, frozen, process_group: as in
            :class:`normkit.SwitchNorm2d`.
        radius: the radius at construction, in :math:`[0, r_c]`. Default: 0 (sparsemax).
        radius_steps: ``T`` of the linear schedule, or None. Default: 10000.
        radius_schedule: ``step -> radius``, replaces ``radius_steps``. Default: None.

    Attributes:
        mean_weights, var_weights: the sparsestmax importance weights at the current radius.
        max_radius: :math:`r_c = \sqrt{1 - 1/K}`.

    Shape:
        - Input: see the subclass; optional ``mask`` as in :class:`normkit.BatchNorm2d`.
        - Output: same shape as the input.

    Examples::

        >>> import torch, normkit
        >>> ssn = normkit.SparseSwitchNorm2d(8, radius_steps=100)
        >>> for _ in range(90):
        ...     _ = ssn(torch.randn(4, 8, 5, 5))
        >>> ssn.mean_weights
        tensor([1., 0., 0.], dtype=torch.float64, grad_fn=<SelectBackward0>)
    """

    #: :func:`normkit.harden` replaces it only once its weights are exactly one-hot (whatever
    #: the threshold), so hardening never changes its output.
    hardens_when_one_hot = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        sources: Sequence[str] = ("in", "ln", "bn"),
        affine: bool = True,
        last_gamma: bool = False,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        center: bool = True,
        scale: bool = True,
        axis: int = 1,
        frozen: bool = False,
        process_group: Any = None,
        radius: float = 0.0,
        radius_steps: Optional[int] = 10000,
        radius_schedule: Optional[Callable[[int], float]] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, sources, affine, last_gamma, track_running_stats, device,
                         dtype, bias=bias, center=center, scale=scale, axis=axis, frozen=frozen,
                         process_group=process_group)
        if radius_steps is not None and (isinstance(radius_steps, bool) or not isinstance(radius_steps, int)
                                         or radius_steps < 1):
            raise ValueError(f"radius_steps must be a positive int (training steps) or None, got {radius_steps!r}")
        if radius_schedule is not None and not callable(radius_schedule):
            raise ValueError(f"radius_schedule must be a callable step -> radius or None, got {radius_schedule!r}")
        self.radius_steps = radius_steps
        self.radius_schedule = radius_schedule
        self.register_buffer("radius", torch.tensor(self._checked(radius, "radius"), dtype=torch.float64,
                                                    device=device))
        self.register_buffer("radius_step", torch.tensor(0, dtype=torch.long, device=device))

    @property
    def max_radius(self) -> float:
        """:math:`\\sqrt{1 - 1/K}`: the radius at which the weights are one-hot."""
        return max_radius(len(self.sources))

    def _checked(self, radius: Any, what: str) -> float:
        value = float(radius)
        if not value >= 0.0 or math.isinf(value):
            raise ValueError(f"{what} must be a finite number >= 0, got {radius!r}")
        return min(value, self.max_radius)

    def set_radius(self, radius: float) -> None:
        """Set the radius (clipped to :attr:`max_radius`), e.g. from your own training loop."""
        self.radius.fill_(self._checked(radius, "radius"))

    def _mix_inputs(self, mean_logits: Tensor, var_logits: Tensor) -> tuple[type[MixSpec], Tensor, Tensor]:
        return (MixSpec, *self._importance_weights())

    def _importance_weights(self) -> tuple[Tensor, Tensor]:
        # One training step; a torch.func transform (jacrev, vmap, ...) analyses the layer and
        # cannot mutate its buffers. The radius of a step comes from the steps taken before it,
        # so the first step is sparsemax (r = 0): the logits start equal, and equal logits with
        # r > 0 sit at the tie point, whose gradient is zero; they would never move.
        radius = self.radius
        if self.training and torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            step = self.radius_step
            scheduled: Any = None  # the radius of this step, when the weights take it directly
            if self.radius_schedule is not None:
                radius.fill_(self._checked(self.radius_schedule(int(step)), "radius_schedule(step)"))
            elif self.radius_steps is not None:
                if type(step) is Tensor and step.is_cpu and radius.is_cpu and not torch.compiler.is_compiling():
                    # eager on plain CPU tensors: host arithmetic, the same float64 division
                    value = min(step.tolist() / self.radius_steps, self.max_radius)
                    radius.fill_(value)
                    if radius.dtype is torch.float64:
                        scheduled = value
                else:  # tensor ops: no host read of the step
                    value = (step.double() / self.radius_steps).clamp(max=self.max_radius)
                    radius.copy_(value)
                    # the weights from the value, not the buffer read back: compiled code (torch
                    # 2.13) can drop the write to a 0-dim float64 buffer
                    scheduled = value.to(radius.dtype)
            step.add_(1)
            if scheduled is not None:
                return layer_weights(self.mean_logits, self.var_logits, scheduled)
        return layer_weights(self.mean_logits, self.var_logits, radius)

    @property
    def mean_weights(self) -> Tensor:
        """Sparsestmax importance weights of the means at the current radius (float64)."""
        return layer_weights(self.mean_logits, self.var_logits, self.radius)[0]

    @property
    def var_weights(self) -> Tensor:
        """Sparsestmax importance weights of the variances at the current radius (float64)."""
        return layer_weights(self.mean_logits, self.var_logits, self.radius)[1]

    def extra_repr(self) -> str:
        text = super().extra_repr()
        schedule = "radius_schedule=<callable>" if self.radius_schedule is not None else f"radius_steps={self.radius_steps}"
        return f"{text}, radius={float(self.radius):.4g}, {schedule}"


class SparseSwitchNorm1d(_SparseSwitchNorm):
    __doc__ = _SparseSwitchNorm.__doc__.replace("see the subclass", "``(N, C)`` or ``(N, C, L)``")
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class SparseSwitchNorm2d(_SparseSwitchNorm):
    __doc__ = _SparseSwitchNorm.__doc__.replace("see the subclass", "``(N, C, H, W)``")
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class SparseSwitchNorm3d(_SparseSwitchNorm):
    __doc__ = _SparseSwitchNorm.__doc__.replace("see the subclass", "``(N, C, D, H, W)``")
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
