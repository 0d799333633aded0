"""What a kernel set is: the full-size passes of a normalization, and optionally the whole
layer for the spec types it was written for."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from torch import Tensor

__all__ = ["KernelSet"]


class KernelSet(NamedTuple):
    """The four full-size loops; all statistics are (N, C) in the statistics dtype.

    * ``supports(x, axis) -> Optional[str]``: None when this set handles this input, else why not.
    * ``moments(x, axis) -> (mean, var)``: per-(n, c) mean and biased variance.
    * ``apply(x, mu, scale, shift, axis) -> y``: ``(x - mu) * scale + shift`` in x's dtype.
    * ``reduce(dy, x, mean, axis) -> (sum_dy, sum_dy_xc)``: sums of ``dy`` and
      ``dy * (x - mean)`` over each (n, c).
    * ``backward_apply(dy, x, mean, scale, p, q, axis) -> dx``:
      ``dy * scale + (x - mean) * q + p`` in x's dtype.
    * ``masks``: whether the four passes take a validity mask, as the keyword ``mask``: the
      mask broadcast to x's shape without its channel axis, as a contiguous ``torch.uint8``
      tensor of N * L elements (1 = valid; positions in x's dim order). Masked, ``moments``
      returns ``(mean, var, count)`` over the valid positions (``count`` (N, 1), a sample
      with none gets mean 0 and variance 0), ``reduce`` sums over them only, and ``apply``
      and ``backward_apply`` write 0 at padded positions; nothing a padded position holds
      (NaN, inf) reaches any result. A set that does not declare it never receives a mask.
    * ``masked_layer``: optional, for a set with ``masks``: the whole layer of a spec in
      ``layer_specs`` with a mask (eager mode on real tensors), signature of
      :func:`normkit.kernels.ops.masked_layer_op`.
    * ``layer_specs``: the spec *types* (exact classes, never subclasses) whose whole layer
      (mix included) this set runs natively, through ``layer`` (a callable with the
      signature of :func:`normkit.kernels.ops.layer_norm_op`).

    ``axis`` is the non-negative channel axis. The passes are spec-independent: any
    normalization ``(x - mu) * scale + shift`` whose ``mu`` and ``scale`` are functions of
    the per-(n, c) moments runs on them, with its mix differentiated by autograd.
    """

    name: str
    supports: Callable[[Tensor, int], Optional[str]]
    moments: Callable[..., tuple[Tensor, Tensor]]
    apply: Callable[..., Tensor]
    reduce: Callable[..., tuple[Tensor, Tensor]]
    backward_apply: Callable[..., Tensor]
    layer_specs: tuple[type, ...] = ()
    layer: Optional[Callable[..., tuple]] = None
    masks: bool = False
    masked_layer: Optional[Callable[..., tuple]] = None

    def runs_layer(self, spec: object) -> bool:
        """Whether this set runs the whole layer of ``spec`` natively (exact type match)."""
        return self.layer is not None and type(spec) in self.layer_specs
