"""Switchable Normalization.

Luo, Ren, Peng, Zhang, Li, "Differentiable Learning-to-Normalize via Switchable
Normalization", ICLR 2019 (arXiv:1806.10779). Each layer learns a softmax mix of
Instance, Layer and Batch statistics (and optionally Group statistics), separately for
means and variances, all derived from one pass of per-(sample, channel) moments.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from normkit._core import MixSpec, SoftmaxMixSpec, check_weights, parse_sources
from normkit.nn._base import NormBase, registered

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d"]


class _SwitchNorm(NormBase):
    r"""Applies Switchable Normalization over the channel axis.

    .. math::
        y = \gamma \frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma_k^2 + \epsilon}} + \beta,
        \qquad w = \mathrm{softmax}(\text{mean\_logits}),\quad w' = \mathrm{softmax}(\text{var\_logits})

    where :math:`(\mu_k, \sigma^2_k)` are the statistics of source ``k``: ``'in'`` per
    (sample, channel), ``'ln'`` per sample, ``'bn'`` per channel, ``'gnG'`` per (sample,
    group of C/G channels). All are exact merges of the per-(sample, channel) moments, so x
    is read once for statistics. Variances are biased, so one-hot weights give exactly
    IN, LN or BN. The importance weights are per layer, shared by all channels.

    In eval the BN source uses the running averages (``track_running_stats=True``), which
    :func:`normkit.recompute_stats` can set to exact population statistics ("batch
    average", the paper's recommendation); IN and LN always come from the sample.

    Degenerate shapes never give NaN: with one position per channel (``L = 1``, e.g.
    ``(N, C, 1, 1)``) the IN statistics are the value itself with variance 0, so the IN
    source contributes ``beta``; with ``N = 1`` the BN source equals the IN source. A
    training batch with a single value per channel leaves the running averages unchanged.

    Differences from the official code and Keras ports: biased variances in every source
    (the official code mixes an unbiased IN variance into LN and BN); ``momentum`` is the
    weight of the new batch (PyTorch convention; their 0.9 / 0.997 is 0.1 / 0.003 here).

    Args:
        num_features: number of channels ``C``.
        eps: added to the mixed variance. Default: 1e-5.
        momentum: weight of the new batch in the BN source's running averages; ``None``:
            cumulative average. Default: 0.1.
        sources: the statistics to mix, a non-empty subset of ``'in'``, ``'ln'``, ``'bn'``
            and ``'gnG'`` (``G`` groups dividing ``C``). Default: ``('in', 'ln', 'bn')``.
        affine: learnable ``gamma``, ``beta``. Default: True.
        last_gamma: initialise ``gamma`` to 0 (last norm of a residual branch). Default: False.
        track_running_stats: keep running averages for the BN source. Default: True.
        device, dtype, bias, center, scale, axis, frozen, process_group: as in
            :class:`normkit.BatchNorm2d`.

    SwitchNorm is deliberately not a subclass of ``torch.nn.BatchNorm*d``: tools that find
    batch norms by type (``SyncBatchNorm.convert_sync_batchnorm``, Conv-BN fusers,
    ``swa_utils.update_bn``) would treat it as a plain BN and silently drop its IN and LN
    statistics. Test for :class:`normkit.NormModule` to find every normkit layer.

    Attributes:
        mean_logits, var_logits: ``(K,)`` parameters, one entry per source, equal at start.
        mean_weights, var_weights: their softmax (read-only importance weights).

    Shape:
        - Input: see the subclass; optional ``mask`` as in :class:`normkit.BatchNorm2d`.
        - Output: same shape as the input.

    Examples::

        >>> import torch, normkit
        >>> sn = normkit.SwitchNorm2d(16)
        >>> sn(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
        >>> sn.mean_weights
        tensor([0.3333, 0.3333, 0.3333], grad_fn=<SoftmaxBackward0>)
    """

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
    ) -> None:
        # set first: the base's constructor asks whether 'bn' is a source and resets gamma
        self.sources = self._parsed = parse_sources(sources, num_features)
        self.last_gamma = last_gamma
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, center=center, scale=scale, axis=axis, frozen=frozen, process_group=process_group,
        )
        k = len(self.sources)
        self.mean_logits = nn.Parameter(torch.zeros(k, device=device, dtype=dtype))
        self.var_logits = nn.Parameter(torch.zeros(k, device=device, dtype=dtype))

    def _tracks_running_source(self) -> bool:
        return "bn" in self.sources

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.last_gamma and self.weight is not None:
            nn.init.zeros_(self.weight)
        if hasattr(self, "mean_logits"):
            nn.init.zeros_(self.mean_logits)
            nn.init.zeros_(self.var_logits)

    @property
    def mean_weights(self) -> Tensor:
        """Softmax importance weights of the means, one per source in ``sources`` order."""
        return torch.softmax(self.mean_logits, 0)

    @property
    def var_weights(self) -> Tensor:
        """Softmax importance weights of the variances, one per source in ``sources`` order."""
        return torch.softmax(self.var_logits, 0)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if self.sources is not getattr(self, "_parsed", None):  # reassigned since construction: check it
            self.sources = self._parsed = parse_sources(self.sources, self.num_features)
        if len(self.sources) == 1:
            return self._run(x, mask, self.sources)
        mean_logits, var_logits = registered(self, "mean_logits"), registered(self, "var_logits")
        check_weights(mean_logits, "mean_logits", self.sources, x.device)
        check_weights(var_logits, "var_logits", self.sources, x.device)
        spec_type, mean_in, var_in = self._mix_inputs(mean_logits, var_logits)
        return self._run(x, mask, self.sources, mean_weights=mean_in, var_weights=var_in, spec_type=spec_type)

    def _mix_inputs(self, mean_logits: Tensor, var_logits: Tensor) -> tuple[type[MixSpec], Tensor, Tensor]:
        """``(spec type, mean input, variance input)`` of the mix. SN's policy: the logits,
        which the mix turns into their float64 softmaxes (the fused CPU kernel in the same
        call). A subclass with another policy returns ``MixSpec`` and its weights."""
        return SoftmaxMixSpec, mean_logits, var_logits

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text.replace(", affine=", f", sources={self.sources}, affine=", 1) + (
            ", last_gamma=True" if self.last_gamma else ""
        )


class SwitchNorm1d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__.replace("see the subclass", "``(N, C)`` or ``(N, C, L)``")
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class SwitchNorm2d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__.replace("see the subclass", "``(N, C, H, W)``")
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class SwitchNorm3d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__.replace("see the subclass", "``(N, C, D, H, W)``")
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
