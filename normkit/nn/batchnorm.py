"""Batch Normalization, drop-in for ``torch.nn.BatchNorm*d``.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift", ICML 2015. Adds the options of the Keras / GoMLX batch norms:
``center`` and ``scale`` separately, a feature ``axis`` (channels-last), ``frozen``
statistics, masks for padded positions and statistics synchronised across processes.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from normkit.nn._base import NormBase

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm(NormBase):
    r"""Applies Batch Normalization over the channel axis.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Mean and (biased) variance are taken over every axis but the channel axis. In training
    the running averages move by ``momentum`` towards the batch statistics (unbiased
    variance); in eval they replace them. Same defaults, state-dict keys, outputs, gradients
    and running statistics as ``torch.nn.BatchNorm*d``, of which each class is a subclass
    (``isinstance(normkit.BatchNorm2d(8), torch.nn.BatchNorm2d)`` holds, so torch's own tools
    find it: ``SyncBatchNorm.convert_sync_batchnorm``, ``torch.nn.utils.fusion``,
    ``torch.optim.swa_utils.update_bn``; see the README's table for what they drop).

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the new batch in the running averages (PyTorch convention;
            Keras' ``momentum=0.99`` is ``momentum=0.01`` here). ``None``: cumulative
            average. Default: 0.1.
        affine: learnable ``gamma`` and ``beta``. Default: True.
        track_running_stats: keep running averages (else batch statistics in eval too).
            Default: True.
        device, dtype: of the parameters and buffers (positional too, as in torch).
        bias: learnable ``beta`` (with ``affine``), torch's name. Default: True.
        center: learnable ``beta`` (with ``affine``), Keras' name for ``bias``. Default: True.
        scale: learnable ``gamma`` (with ``affine``). Default: True.
        axis: the channel axis; ``-1`` for channels-last ``(N, ..., C)``. Default: 1.
        frozen: use and keep the running averages even in ``train()`` (fine-tuning);
            ``gamma`` and ``beta`` still train. Default: False.
        process_group: merge batch statistics over this ``torch.distributed`` group in
            training (``torch.distributed.group.WORLD`` for all ranks). Default: None.

    Shape:
        - Input: see the subclass; ``mask`` (optional, bool): the input's shape without
          its channel axis (same rank, sizes 1 broadcast: ``(N, L)`` for ``(N, C, L)`` or
          ``(N, L, C)``, ``(N, H, W)`` for images), True = valid. Statistics and running
          averages see valid positions only; padded outputs are 0 and carry no gradient
          (see ``docs/MASKS.md``).
        - Output: same shape as the input.

    Examples::

        >>> import torch, normkit
        >>> bn = normkit.BatchNorm2d(16)
        >>> bn(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    _needs_two_values = True

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self._run(x, mask, ("bn",))

    def to_torch(self) -> nn.Module:
        return self._twin(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    __doc__ = _BatchNorm.__doc__.replace("see the subclass", "``(N, C)`` or ``(N, C, L)``")
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    __doc__ = _BatchNorm.__doc__.replace("see the subclass", "``(N, C, H, W)``")
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    __doc__ = _BatchNorm.__doc__.replace("see the subclass", "``(N, C, D, H, W)``")
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
