"""Weight Standardization, applied with ``torch.nn.utils.parametrize``.

Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", 2019 (arXiv:1903.10520); the optional learnable gain is the
scaled WS of Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization" (NF-Nets), ICML 2021.

The weight is standardised *in every forward pass*, as a function of the stored weight, so
gradients flow through the standardisation. Seed 004's Keras snippet passes its WS function
as ``kernel_regularizer``, which only adds its (None) return value to the loss and never
changes the kernel the convolution uses: that mistake cannot be written with this API.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["WeightStandardization", "weight_standardization", "WSConv2d"]

_SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class WeightStandardization(nn.Module):
    r"""The parametrization: standardise each output filter over its fan-in.

    .. math:: \hat W_o = g_o \frac{W_o - \mathrm{mean}(W_o)}{\sqrt{\mathrm{Var}(W_o) + \epsilon}}

    over the ``fan_in = in_channels / groups * prod(kernel_size)`` entries of filter ``o``,
    with the *biased* variance (so that ``eps -> 0`` gives mean 0 and biased std exactly 1),
    computed in float32 at least. ``g`` is a learnable per-filter gain (init 1) when
    ``gain=True``, else 1.

    Args:
        out_features: number of filters (the weight's dim 0).
        ndim: number of dims of the weight.
        eps: added to the variance. Default: 1e-6 (as timm's ``StdConv2d``).
        gain: learnable per-filter gain. Default: False.
    """

    def __init__(self, out_features: int, ndim: int, eps: float = 1e-6, gain: bool = False, *,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps
        shape = (out_features,) + (1,) * (ndim - 1)
        self.gain = nn.Parameter(torch.ones(shape, device=device, dtype=dtype)) if gain else None

    def forward(self, weight: Tensor) -> Tensor:
        dims = tuple(range(1, weight.dim()))
        w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        var, mean = torch.var_mean(w, dim=dims, correction=0, keepdim=True)
        out = ((w - mean) * torch.rsqrt(var + self.eps)).to(weight.dtype)
        return out * self.gain if self.gain is not None else out

    def extra_repr(self) -> str:
        return f"eps={self.eps}, gain={self.gain is not None}"


def weight_standardization(module: nn.Module, eps: float = 1e-6, gain: bool = False) -> nn.Module:
    r"""Standardise the weight of a ``Conv1d/2d/3d`` or ``Linear`` in every forward pass.

    Registers :class:`WeightStandardization` on ``module.weight`` with
    ``torch.nn.utils.parametrize``: ``module.weight`` is then the standardised weight
    (per output filter: mean 0, biased std :math:`\sqrt{\sigma^2 / (\sigma^2 + \epsilon)}
    \approx 1`, times the gain), the trained tensor is ``module.parametrizations.weight.original``
    and gradients flow through the standardisation into it. State-dict keys change
    accordingly (``parametrizations.weight.original``); ``torch.nn.utils.parametrize.
    remove_parametrizations(module, "weight")`` bakes the standardised weight back in
    (:func:`normkit.fuse` does this by itself).

    Args:
        module: a ``torch.nn.Conv1d``, ``Conv2d``, ``Conv3d`` or ``Linear`` (subclasses too).
        eps: added to the per-filter variance. Default: 1e-6.
        gain: add a learnable per-filter gain, init 1 (NF-Net style). Default: False.

    Returns:
        ``module``, parametrized in place.

    Raises:
        TypeError: another module type (transposed convolutions keep filters on dim 1).
        ValueError: ``module.weight`` is already standardised.

    Examples::

        >>> import torch, normkit
        >>> conv = normkit.weight_standardization(torch.nn.Conv2d(3, 8, 3))
        >>> w = conv.weight.reshape(8, -1)
        >>> bool(w.mean(1).abs().max() < 1e-6)
        True
    """
    if not isinstance(module, _SUPPORTED) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise TypeError(
            "weight_standardization expects a torch.nn.Conv1d, Conv2d, Conv3d or Linear, "
            f"got {type(module).__name__}"
        )
    if parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, WeightStandardization) for p in module.parametrizations.weight
    ):
        raise ValueError(f"{type(module).__name__}.weight is already standardised; apply weight_standardization once")
    weight = module.weight
    parametrize.register_parametrization(
        module, "weight",
        WeightStandardization(weight.shape[0], weight.dim(), eps, gain, device=weight.device, dtype=weight.dtype),
    )
    return module


class WSConv2d(nn.Conv2d):
    r"""``torch.nn.Conv2d`` with Weight Standardization (see :func:`weight_standardization`).

    Args:
        *args, **kwargs: as ``torch.nn.Conv2d``.
        eps: added to the per-filter variance. Default: 1e-6.
        gain: learnable per-filter gain (NF-Net style). Default: False.

    Shape:
        As ``torch.nn.Conv2d``.

    Examples::

        >>> import torch, normkit
        >>> conv = normkit.WSConv2d(3, 16, 3, padding=1, gain=True)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, *args: Any, eps: float = 1e-6, gain: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        weight_standardization(self, eps=eps, gain=gain)
