r"""Batch Renormalization.

Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
Models", NeurIPS 2017 (arXiv:1702.03275). Batch norm whose training output is corrected
towards the running statistics, so that training and inference normalise with the same
statistics and small or non-i.i.d. minibatches matter less.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from normkit import functional as F
from normkit.nn._base import NormBase, registered

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]

#: The paper's warm-up (ImageNet, Inception-v2, 160k steps): r_max = 1 and d_max = 0 for the
#: first 5k steps, then linear up to r_max at 40k and to d_max at 25k steps.
PAPER_WARMUP = (5000, 40000, 25000)


class _BatchRenorm(NormBase):
    r"""Applies Batch Renormalization over the channel axis.

    In training, with the batch statistics :math:`\mu_B`, :math:`\sigma_B = \sqrt{\sigma_B^2 +
    \epsilon}` (biased variance) and the running ones :math:`\mu`, :math:`\sigma =
    \sqrt{\text{running\_var} + \epsilon}`:

    .. math::
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta, \qquad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\frac{\sigma_B}{\sigma}, \qquad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\frac{\mu_B - \mu}{\sigma}

    with ``r`` and ``d`` constants in backward (the gradient is batch norm's, scaled by ``r``).
    Its spec is :class:`normkit._core.RenormSpec`: batch norm with the per-channel affine
    :math:`(\gamma r,\ \beta + \gamma d)`, which the fused CPU operator computes between the
    moments and the apply (one call and one read of ``x`` forward, as batch norm; ``r`` and
    ``d`` are kept for the backward). With ``r_max = 1, d_max = 0`` the output and gradients
    are batch norm's exactly. In eval: :math:`y = \gamma (x - \mu) / \sigma + \beta`.

    **Running statistics** move as in the paper's Algorithm 1, once per training call:
    :math:`\mu \leftarrow \mu + \alpha (\mu_B - \mu)`, :math:`\sigma \leftarrow \sigma +
    \alpha (\sigma_B - \sigma)`, stored as ``running_var`` :math:`= \sigma^2 - \epsilon` (so the
    state-dict keys and every tool are batch norm's). ``α`` is ``momentum``, the weight of the
    new batch (PyTorch's convention). The default 0.01 is Keras' ``renorm_momentum=0.99``; with
    ``momentum=α`` this layer equals Keras' ``BatchNormalization(renorm=True, momentum=1-α,
    renorm_momentum=1-α, renorm_clipping={"rmax": r_max, "rmin": 1/r_max, "dmax": d_max})``.
    (Unlike torch's batch norm, the variance average is of the biased, ``eps``-shifted
    standard deviations, as the paper and Keras.) Channels that saw at most one value keep
    their statistics.

    **Warm-up.** The current clipping bounds are the buffers ``renorm_rmax`` and
    ``renorm_dmax`` (saved in the state dict), set from the buffer ``renorm_step`` (training
    steps taken; a forward in training mode with gradients enabled, outside ``torch.func``
    transforms, is one step, forwards in
    eval or under ``torch.no_grad()``, such as :func:`normkit.recompute_stats`, are not), so
    a resumed training continues the same schedule. By default the paper's:
    :math:`r_{max} = 1, d_{max} = 0` for ``warmup[0]`` steps, then linear up to ``r_max`` at
    ``warmup[1]`` and ``d_max`` at ``warmup[2]`` steps (``warmup=(0, 0, 0)``: no warm-up).
    ``clip_schedule(step) -> (r_max, d_max)`` replaces it.

    ``BatchRenorm`` is deliberately not a subclass of ``torch.nn.BatchNorm*d`` (nor of torch's
    ``_BatchNorm``): ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, Conv-BN fusers and
    other tools that find batch norms by type would treat it as a plain batch norm and
    silently drop the renormalization. normkit's :func:`normkit.convert` (``"sync"``) and
    :func:`normkit.fuse` know it (in eval it is an affine map per channel, so it fuses).

    ``track_running_stats=False`` leaves nothing to renormalise against: the layer is then
    batch norm with batch statistics, in eval too.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variances. Default: 1e-5.
        momentum: ``α``, the weight of the new batch in the running statistics; ``None``:
            cumulative average. Default: 0.01.
        affine, track_running_stats, device, dtype, bias, center, scale, axis, frozen,
            process_group: as in :class:`normkit.BatchNorm2d` (with ``process_group`` the
            batch statistics, hence ``r`` and ``d``, are those of all ranks).
        r_max: the final bound of ``r`` (clipped to ``[1/r_max, r_max]``), >= 1. Default: 3.
        d_max: the final bound of ``d`` (clipped to ``[-d_max, d_max]``), >= 0. Default: 5.
        warmup: ``(start, r_max_at, d_max_at)`` steps of the linear warm-up. Default:
            ``(5000, 40000, 25000)``, the paper's.
        clip_schedule: ``step -> (r_max, d_max)``, replaces ``warmup`` (not saved: pass the
            same one when you rebuild the layer). Default: None.

    Shape:
        - Input: see the subclass; optional ``mask`` as in :class:`normkit.BatchNorm2d`.
        - Output: same shape as the input.

    Examples::

        >>> import torch, normkit
        >>> brn = normkit.BatchRenorm2d(16, warmup=(0, 0, 0))
        >>> brn(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
        >>> float(brn.renorm_rmax), float(brn.renorm_dmax), int(brn.renorm_step)
        (3.0, 5.0, 1)
    """

    _needs_two_values = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
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
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup: tuple[int, int, int] = PAPER_WARMUP,
        clip_schedule: Optional[Callable[[int], tuple[float, float]]] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         center=center, scale=scale, axis=axis, frozen=frozen, process_group=process_group)
        F._check_clip(r_max, d_max)
        if (not isinstance(warmup, (tuple, list)) or len(warmup) != 3
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in warmup)
                or warmup[1] < warmup[0] or warmup[2] < warmup[0]):
            raise ValueError(
                "warmup must be (start, r_max_at, d_max_at): non-negative int steps with start <= both others, "
                f"got {warmup!r}"
            )
        if clip_schedule is not None and not callable(clip_schedule):
            raise ValueError(f"clip_schedule must be a callable step -> (r_max, d_max) or None, got {clip_schedule!r}")
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup = tuple(warmup)
        self.clip_schedule = clip_schedule
        rmax, dmax = self._clip_at(0)
        factory = {"dtype": torch.float64, "device": device}
        self.register_buffer("renorm_step", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("renorm_rmax", torch.tensor(rmax, **factory))
        self.register_buffer("renorm_dmax", torch.tensor(dmax, **factory))

    def _clip_at(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` after ``step`` training steps."""
        if self.clip_schedule is not None:
            bounds = self.clip_schedule(step)
            if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
                raise ValueError(f"clip_schedule({step}) must return (r_max, d_max), got {bounds!r}")
            rmax, dmax = float(bounds[0]), float(bounds[1])
            F._check_clip(rmax, dmax)
            return rmax, dmax
        start, r_at, d_at = self.warmup
        if step <= start:
            return 1.0, 0.0
        rmax = self.r_max if step >= r_at else 1.0 + (self.r_max - 1.0) * (step - start) / (r_at - start)
        dmax = self.d_max if step >= d_at else self.d_max * (step - start) / (d_at - start)
        return rmax, dmax

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batch and no warm-up step seen."""
        super().reset_running_stats()
        if hasattr(self, "renorm_step"):
            self.renorm_step.zero_()
            rmax, dmax = self._clip_at(0)
            self.renorm_rmax.fill_(rmax)
            self.renorm_dmax.fill_(dmax)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        running_mean = registered(self, "running_mean")
        if not (self.training and not self.frozen and running_mean is not None):
            return self._run(x, mask, ("bn",))  # eval, frozen or no running statistics: batch norm
        axis = self._check_input(x)
        group = self._sync_group(x)
        if mask is None and group is None and x.numel() // x.shape[axis] == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {list(x.shape)} "
                f"({type(self).__name__}); use a batch of 2 or more, eval(), or frozen=True"
            )
        buffers = self._buffers
        batches, step = buffers["num_batches_tracked"], buffers["renorm_step"]
        if step.is_meta or isinstance(step, FakeTensor):  # no values: the initial bounds
            batches.add_(1)
            rmax, dmax = self._clip_at(0)
        elif torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():  # one warm-up step
            rmax, dmax = self._advance(batches)
        else:
            batches.add_(1)
            rmax, dmax = float(self.renorm_rmax), float(self.renorm_dmax)
        factor = self.momentum if self.momentum is not None else 1.0 / float(batches)
        return F.renorm_train(x, registered(self, "weight"), registered(self, "bias"), running_mean,
                              registered(self, "running_var"), rmax, dmax, factor, self.eps, axis, mask, group)

    # Eager even inside torch.compile: torch 2.13 drops in-place writes to 0-dim float64
    # buffers in compiled code (the bounds buffers kept their initial values), and the step is
    # read back with int() here anyway (a graph break either way).
    @torch.compiler.disable
    def _advance(self, batches: Tensor) -> tuple[float, float]:
        """One warm-up step: ``renorm_step += 1`` (with ``batches``, the batch count, in the same
        operation) and the bounds of the new step.

        The step and bounds last written are remembered with the buffers' version counters
        (and the step's storage address), which every in-place change (``load_state_dict``,
        ``reset_running_stats``, a user's ``fill_``) bumps: while they match, the step is known
        without reading the buffer back and unchanged bounds are not written again (on small
        inputs each of those tensor operations costs a tenth of the layer). Writes through
        ``.data`` bump no counter and are not seen: change the buffers themselves (``fill_``,
        ``copy_``, ``load_state_dict``)."""
        buffers = self._buffers
        step_t, rmax_t, dmax_t = buffers["renorm_step"], buffers["renorm_rmax"], buffers["renorm_dmax"]
        cached = self.__dict__.get("_renorm_cache")  # (the three buffers, their versions, step, bounds)
        hit = cached is not None and cached[0] is step_t and cached[1] is rmax_t and cached[2] is dmax_t \
            and cached[3] == (step_t._version, rmax_t._version, dmax_t._version, step_t.data_ptr())
        step = cached[4] + 1 if hit else int(step_t) + 1
        torch._foreach_add_([step_t, batches], 1)
        bounds = self._clip_at(step)
        if not hit or cached[5] != bounds:
            rmax_t.fill_(bounds[0])
            dmax_t.fill_(bounds[1])
        # (data_ptr: ``buffer.data = other`` swaps the storage without bumping the version)
        self.__dict__["_renorm_cache"] = (step_t, rmax_t, dmax_t,
                                          (step_t._version, rmax_t._version, dmax_t._version, step_t.data_ptr()),
                                          step, bounds)
        return bounds

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_renorm_cache"}  # ids and versions are this process's

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"
        if self.clip_schedule is not None:
            return text + ", clip_schedule=<callable>"
        return text + (f", warmup={self.warmup}" if self.warmup != PAPER_WARMUP else "")


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__.replace("see the subclass", "``(N, C)`` or ``(N, C, L)``")
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__.replace("see the subclass", "``(N, C, H, W)``")
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__.replace("see the subclass", "``(N, C, D, H, W)``")
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
