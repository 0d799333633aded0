"""Group, Layer and Instance Normalization, drop-in for their ``torch.nn`` namesakes.

Wu & He, "Group Normalization", ECCV 2018; Ba, Kiros & Hinton, "Layer Normalization",
2016; Ulyanov, Vedaldi & Lempitsky, "Instance Normalization", 2016. All run on the same
moments routine as :class:`normkit.SwitchNorm2d`, and add ``axis`` and ``mask``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from normkit import functional as F
from normkit._core import normalize_axis
from normkit.nn._base import NormBase, NormModule, check_float_layer_input, check_input, registered

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class GroupNorm(NormModule, nn.GroupNorm):
    r"""Applies Group Normalization: statistics per (sample, group of channels).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    A subclass of ``torch.nn.GroupNorm`` with its arguments, state-dict keys and results.
    ``GroupNorm(C, C)`` is Instance Norm, ``GroupNorm(1, C)`` is the SN paper's Layer Norm
    (over channels and positions, per-channel affine).

    Args:
        num_groups: number of groups, dividing ``num_channels``.
        num_channels: number of channels ``C``.
        eps: added to the variance. Default: 1e-5.
        affine: per-channel learnable ``gamma`` and ``beta``. Default: True.
        device, dtype: of the parameters.
        bias: learnable ``beta`` (with ``affine``). Default: True.
        axis: the channel axis (``-1`` for channels-last). Default: 1.

    Shape:
        - Input: ``(N, C, *)``; optional ``mask`` as in :class:`normkit.BatchNorm2d`.
        - Output: same shape as the input.

    Examples::

        >>> import torch, normkit
        >>> normkit.GroupNorm(4, 16)(torch.randn(2, 16, 5)).shape
        torch.Size([2, 16, 5])
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device: Any = None,
        dtype: Any = None, *, bias: bool = True, axis: int = 1,
    ) -> None:
        for name, value in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        nn.GroupNorm.__init__(self, num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self.axis = axis

    @property
    def num_features(self) -> int:
        return self.num_channels

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        axis = check_input(type(self).__name__, x, self.num_channels, self.axis)
        return F.group_norm(x, self.num_groups, registered(self, "weight"), registered(self, "bias"), self.eps,
                            channel_axis=axis, mask=mask)

    def to_torch(self) -> nn.Module:
        return self._twin(self.num_groups, self.num_channels, self.eps, self.affine)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", axis={self.axis}" if self.axis != 1 else "")


class LayerNorm(NormModule, nn.LayerNorm):
    r"""Applies Layer Normalization over the trailing ``normalized_shape`` dims.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    A subclass of ``torch.nn.LayerNorm`` with its arguments, state-dict keys and results.
    For a layer norm over the channels of an ``(N, C, H, W)`` map (the SN paper's LN), use
    ``GroupNorm(1, C)``.

    Args:
        normalized_shape: the trailing shape to normalise over.
        eps: added to the variance. Default: 1e-5.
        elementwise_affine: learnable ``gamma`` (and ``beta``) of ``normalized_shape``. Default: True.
        bias: learnable ``beta`` too. Default: True.
        device, dtype: of the parameters.

    Shape:
        - Input: ``(*, *normalized_shape)``; optional ``mask`` with the shape of the
          leading dims (True = valid row; sizes 1 broadcast); padded rows are 0 and carry
          no gradient.
        - Output: same shape as the input.

    Examples::

        >>> import torch, normkit
        >>> normkit.LayerNorm(8)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(
        self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True,
        bias: bool = True, device: Any = None, dtype: Any = None,
    ) -> None:
        nn.LayerNorm.__init__(self, normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        check_float_layer_input(type(self).__name__, x)
        return F.layer_norm(x, self.normalized_shape, registered(self, "weight"), registered(self, "bias"), self.eps,
                            mask=mask)

    def to_torch(self) -> nn.Module:
        return self._twin(self.normalized_shape, self.eps, self.elementwise_affine)


class _InstanceNorm(NormBase):
    r"""Applies Instance Normalization: statistics per (sample, channel).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    A subclass of ``torch.nn.InstanceNorm*d`` with its defaults (``affine=False``,
    ``track_running_stats=False``), state-dict keys, results and running-statistics rules:
    with ``track_running_stats`` the running averages are the mean over samples of the
    per-sample estimates, ``momentum=None`` keeps them fixed, and ``num_batches_tracked``
    stays 0. Unbatched inputs (no ``N``) are accepted as in torch.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, center,
        scale, axis, frozen: as in :class:`normkit.BatchNorm2d`.

    Shape:
        - Input: see the subclass; optional ``mask`` as in :class:`normkit.BatchNorm2d`.
        - Output: same shape as the input.

    Examples::

        >>> import torch, normkit
        >>> normkit.InstanceNorm2d(3)(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = False,
        track_running_stats: bool = False, device: Any = None, dtype: Any = None, *, bias: bool = True,
        center: bool = True, scale: bool = True, axis: int = 1, frozen: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         center=center, scale=scale, axis=axis, frozen=frozen)

    def _batch_stats_and_factor(self, running_mean: Optional[Tensor],
                                num_batches_tracked: Optional[Tensor]) -> tuple[bool, float]:
        # torch's instance norm: no batch count, and momentum=None means "leave them as they are"
        use_batch = (self.training and not self.frozen) or running_mean is None
        return use_batch, 0.0 if self.momentum is None else self.momentum

    def _check_input(self, x: Tensor) -> int:
        axis = normalize_axis(self.axis, x.dim()) if x.dim() >= 2 else self.axis
        if x.dim() in self._ranks and x.dim() >= 2 and axis > 0 and x.shape[axis] != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={axis} to match num_features ({self.num_features}), "
                    f"but got: {x.shape[axis]}."
                )
            if self.running_mean is None:  # torch warns and normalises: num_features is not used
                warnings.warn(
                    f"input's size at dim={axis} does not match num_features. You can silence this warning by "
                    "not passing in num_features, which is not used because affine=False",
                    stacklevel=3,
                )
                return check_input(type(self).__name__, x, x.shape[axis], self.axis, self._ranks, self._layout)
        return super()._check_input(x)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == self._ranks[0] - 1:  # unbatched, as torch accepts
            y = self._run(x.unsqueeze(0), None if mask is None else mask.unsqueeze(0), ("in",), running="in")
            return y.squeeze(0)
        return self._run(x, mask, ("in",), running="in")

    def to_torch(self) -> nn.Module:
        return self._twin(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = _InstanceNorm.__doc__.replace("see the subclass", "``(N, C, L)`` or ``(C, L)``")
    _ranks = (3,)
    _layout = "(N, C, L)"


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = _InstanceNorm.__doc__.replace("see the subclass", "``(N, C, H, W)`` or ``(C, H, W)``")
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = _InstanceNorm.__doc__.replace("see the subclass", "``(N, C, D, H, W)`` or ``(C, D, H, W)``")
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
