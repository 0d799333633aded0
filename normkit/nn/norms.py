"""Group, Layer and Instance Normalization, drop-in for their ``torch.nn`` namesakes.

Wu & He, "Group Normalization", ECCV 2018; Ba, Kiros & Hinton, "Layer Normalization",
2016; Ulyanov, Vedaldi & Lempitsky, "Instance Normalization", 2016. All run on the same
moments routine as :class:`normkit.SwitchNorm2d`, and add ``axis`` and ``mask``.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from normkit import functional as F
from normkit._core import check_eps
from normkit.nn._base import NormBase, check_input

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class GroupNorm(nn.Module):
    r"""Applies Group Normalization: statistics per (sample, group of channels).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Same arguments, state-dict keys and results as ``torch.nn.GroupNorm``.
    ``GroupNorm(C, C)`` is Instance Norm, ``GroupNorm(1, C)`` is the SN paper's Layer Norm
    (over channels and positions, per-channel affine).

    Args:
        num_groups: number of groups, dividing ``num_channels``.
        num_channels: number of channels ``C``.
        eps: added to the variance. Default: 1e-5.
        affine: per-channel learnable ``gamma`` and ``beta``. Default: True.
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
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
        axis: int = 1, device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_groups must divide num_channels={num_channels}, got num_groups={num_groups}")
        check_eps(eps)
        self.num_groups, self.num_channels, self.eps, self.affine, self.axis = num_groups, num_channels, eps, affine, axis
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @property
    def num_features(self) -> int:
        return self.num_channels

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        axis = check_input(type(self).__name__, x, self.num_channels, self.axis)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, channel_axis=axis, mask=mask)

    def extra_repr(self) -> str:
        text = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        return text + (f", axis={self.axis}" if self.axis != 1 else "")


class LayerNorm(nn.Module):
    r"""Applies Layer Normalization over the trailing ``normalized_shape`` dims.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Same arguments, state-dict keys and results as ``torch.nn.LayerNorm``. For a layer norm
    over the channels of an ``(N, C, H, W)`` map (the SN paper's LN), use ``GroupNorm(1, C)``.

    Args:
        normalized_shape: the trailing shape to normalise over.
        eps: added to the variance. Default: 1e-5.
        elementwise_affine: learnable ``gamma`` (and ``beta``) of ``normalized_shape``. Default: True.
        bias: learnable ``beta`` too. Default: True.

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
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        check_eps(eps)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if elementwise_affine and bias else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if not x.is_floating_point():
            raise ValueError(f"LayerNorm expects a floating-point input, got dtype {x.dtype}; convert it with x.float()")
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, mask=mask)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class _InstanceNorm(NormBase):
    r"""Applies Instance Normalization: statistics per (sample, channel).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Same defaults (``affine=False``, ``track_running_stats=False``), state-dict keys and
    results as ``torch.nn.InstanceNorm*d``; with ``track_running_stats`` the running
    averages are the mean over samples of the per-sample estimates, as in torch.

    Args:
        num_features, eps, momentum, affine, track_running_stats, center, scale, axis,
        frozen: as in :class:`normkit.BatchNorm2d`.

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
        track_running_stats: bool = False, **kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self._run(x, mask, ("in",), running="in")


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__.replace("see the subclass", "``(N, C, L)``")
    _ranks = (3,)
    _layout = "(N, C, L)"


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__.replace("see the subclass", "``(N, C, H, W)``")
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__.replace("see the subclass", "``(N, C, D, H, W)``")
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
