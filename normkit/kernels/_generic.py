"""The generic fused path: any kernel set's four full-size passes around the Python mix.

Any normkit normalization is ``y = (x - mu) * scale + shift`` where ``mu`` and ``scale``
are (N, C) functions of the per-(n, c) moments of ``x`` (the spec's mix). Differentiating
through the moments gives, with ``m = mean_in[n, c]`` and ``L`` positions::

    dx = scale * dy + p[n, c] + q[n, c] * (x - m),   p = dL/dm / L,  q = 2 dL/dvar_in / L

where dL/dm and dL/dvar_in come from autograd on the small mix graph, fed with the two
per-(n, c) reductions ``sum(dy)`` and ``sum(dy * (x - m))``. So one set of four loops
serves every spec, without saving any full-size temporary besides x itself; nothing here
depends on which normalization the spec describes.

The mix graph is recorded in the forward (when a gradient will be wanted) and kept for the
backward rather than recomputed: the mix runs once per step, so a mix that exchanges
statistics across processes (synchronised layers: one collective forward, its adjoint in
backward) costs exactly those two collectives.

**Masks** (kernel sets that declare ``masks``): the passes see only the valid positions, so
the moments carry per-sample counts (the same :class:`Moments` the masked reference's
``moments`` returns, and the mix already takes counts), ``L`` above becomes ``count[n]``
(``p = dL/dm / count``, ``q = 2 dL/dvar_in / count``), and ``y`` and ``dx`` are 0 at padded
positions. The mask reaches the kernels once, as contiguous uint8 (N, L).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from normkit._core import Moments, apply_affine, broadcast_mask, moments
from normkit.kernels._protocol import KernelSet

__all__ = ["generic_normalize", "kernel_mask"]

MixFn = Callable[..., tuple[Tensor, Tensor, Tensor, Optional[Moments]]]


class _GenericNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernels, axis, mix_fn, tracked_out, record, masks, *small):  # type: ignore[override]
        n, c = x.shape[0], x.shape[axis]
        length = x.numel() // max(n * c, 1)
        valid, mask8 = masks if masks is not None else (None, None)
        if mask8 is None:
            mean, var = kernels.moments(x, axis)
            count = torch.full((n, 1), float(length), dtype=mean.dtype, device=x.device)
        else:
            mean, var, count = kernels.moments(x, axis, mask=mask8)
        wants = ctx.needs_input_grad[7:]
        if record:  # the small graph of the mix, for the backward
            with torch.enable_grad():
                mean_leaf, var_leaf = mean.detach().requires_grad_(), var.detach().requires_grad_()
                leaves = [s.detach().requires_grad_() if (s is not None and want) else s
                          for s, want in zip(small, wants)]
                mu, scale, shift, tracked = mix_fn(Moments(count, mean_leaf, var_leaf), *leaves)
            ctx.graph = (mu, scale, shift, mean_leaf, var_leaf, leaves)
            mu, scale, shift = mu.detach(), scale.detach(), shift.detach()
            if tracked is not None:
                tracked = Moments(*(t.detach() for t in tracked))
        else:
            mu, scale, shift, tracked = mix_fn(Moments(count, mean, var), *small)
        tracked_out.append(tracked)
        y = kernels.apply(x, mu, scale, shift, axis) if mask8 is None else kernels.apply(x, mu, scale, shift, axis,
                                                                                         mask=mask8)
        ctx.kernels, ctx.axis, ctx.mix_fn, ctx.length = kernels, axis, mix_fn, length
        ctx.valid, ctx.mask8 = valid, mask8
        ctx.small_is_none = [s is None for s in small]
        ctx.save_for_backward(x, mean, var, count, *[s for s in small if s is not None])
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, mean, var, count, *present = ctx.saved_tensors
        it = iter(present)
        small = [None if none else next(it) for none in ctx.small_is_none]
        wants = ctx.needs_input_grad[7:]
        if torch.is_grad_enabled():  # a graph of the gradient is wanted (double backward)
            return _differentiable_backward(ctx, dy, x, small, wants)
        mu, scale, shift, mean_leaf, var_leaf, leaves = ctx.graph
        if not (dy.is_contiguous() or dy.is_contiguous(memory_format=torch.channels_last)):
            dy = dy.contiguous()
        mask8 = ctx.mask8
        if mask8 is None:
            sum_dy, sum_dy_xc = ctx.kernels.reduce(dy, x, mean, ctx.axis)
        else:
            sum_dy, sum_dy_xc = ctx.kernels.reduce(dy, x, mean, ctx.axis, mask=mask8)
        mu_d, scale_d = mu.detach(), scale.detach()
        grad_outputs = {"mu": -scale_d * sum_dy, "scale": sum_dy_xc + sum_dy * (mean - mu_d), "shift": sum_dy.sum(0)}
        outs, gouts = [], []
        for name, t in (("mu", mu), ("scale", scale), ("shift", shift)):
            if t.requires_grad:
                outs.append(t)
                gouts.append(grad_outputs[name])
        inputs = [mean_leaf, var_leaf] + [leaf for leaf, want in zip(leaves, wants) if leaf is not None and want]
        # retain_graph: the caller's graph may be run backward again (retain_graph=True there)
        grads = list(torch.autograd.grad(outs, inputs, gouts, allow_unused=True, retain_graph=True)) \
            if outs else [None] * len(inputs)
        g_mean, g_var = grads[0], grads[1]
        small_grads = iter(grads[2:])
        dsmall = [next(small_grads) if (s is not None and want) else None for s, want in zip(small, wants)]
        dx = None
        if ctx.needs_input_grad[0]:
            zeros = torch.zeros_like(mean)
            # per sample: its count of valid positions (a sample with none has no valid dx)
            denom = ctx.length if mask8 is None else count.clamp_min(1.0)
            p = g_mean / denom if g_mean is not None else zeros
            q = 2.0 * g_var / denom if g_var is not None else zeros
            if mask8 is None:
                dx = ctx.kernels.backward_apply(dy, x, mean, scale_d, p, q, ctx.axis)
            else:
                dx = ctx.kernels.backward_apply(dy, x, mean, scale_d, p, q, ctx.axis, mask=mask8)
        return (dx, None, None, None, None, None, None, *dsmall)


def _differentiable_backward(ctx, dy: Tensor, x: Tensor, small: list, wants: tuple) -> tuple:
    """The backward as plain ATen ops on the saved tensors, so that autograd can differentiate
    it again (the kernels' passes have no derivative of their own)."""
    with torch.enable_grad():
        mu, scale, shift, _ = ctx.mix_fn(moments(x, ctx.axis, ctx.valid), *small)
        if ctx.valid is None:
            y = apply_affine(x, mu, scale, shift, ctx.axis)
        else:  # the masked reference: padded x zeroed before the affine (0 * NaN), y after
            valid = ctx.valid.unsqueeze(ctx.axis)
            y = torch.where(valid, apply_affine(torch.where(valid, x, 0.0), mu, scale, shift, ctx.axis), 0.0)
        wanted = [x] if ctx.needs_input_grad[0] else []
        wanted += [s for s, want in zip(small, wants) if s is not None and want]
        found = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    dx = next(found) if ctx.needs_input_grad[0] else None
    dsmall = [next(found) if (s is not None and want) else None for s, want in zip(small, wants)]
    return (dx, None, None, None, None, None, None, *dsmall)


def generic_normalize(kernels: KernelSet, x: Tensor, axis: int, mix_fn: MixFn, small: tuple,
                      mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Moments]]:
    """``(y, tracked)`` with ``mix_fn(moments, *small) -> (mu, scale, shift, tracked)``.

    Tensors the mix reads but never differentiates (running statistics) belong in
    ``mix_fn``'s closure, not in ``small``. ``mask`` (bool, x's shape without its channel
    axis, sizes 1 broadcast; only for a set that declares ``masks``): only valid positions
    count, padded outputs and gradients are 0."""
    tracked: list = []
    record = torch.is_grad_enabled() and (x.requires_grad or any(s is not None and s.requires_grad for s in small))
    masks = None
    if mask is not None:
        if not kernels.masks:
            raise ValueError(f"the {kernels.name!r} kernel set takes no masks")
        masks = kernel_mask(x, axis, mask)
    y = _GenericNorm.apply(x, kernels, axis, mix_fn, tracked, record, masks, *small)
    return y, tracked[0]


def kernel_mask(x: Tensor, axis: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(valid, mask8)``: the mask checked and broadcast to x's shape without its channel
    axis (bool), and the same as the contiguous uint8 (N, L) the kernels read."""
    target = list(x.shape)
    del target[axis]
    valid = broadcast_mask(mask, target, x.device, "the input without its channel axis")
    flat = valid.contiguous()  # a copy only when the mask broadcasts or is strided
    return valid, flat.view(torch.uint8).reshape(x.shape[0], -1)
