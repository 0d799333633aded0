r"""Statistics merged across processes with ``torch.distributed`` (synchronised BN / SN).

Under data parallelism every process sees a shard of the batch, so the BN source's
statistics are per-process unless they are merged. ``torch.nn.SyncBatchNorm`` does this for
BN on CUDA only; here any normkit layer with a BN source merges its per-channel
``(count, mean, biased var)`` over a process group, on any backend (gloo on CPU, NCCL on
GPU), with Chan et al.'s parallel formula (Chan, Golub & LeVeque, "Updating formulae and a
pairwise algorithm for computing sample variances", 1979):

.. math::
    n = \sum_r n_r,\qquad
    \mu = \sum_r \frac{n_r}{n}\mu_r,\qquad
    \sigma^2 = \sum_r \frac{n_r}{n}\left(\sigma_r^2 + (\mu_r - \mu)^2\right)

Each rank contributes its centred statistics, never raw power sums, so inputs with
``|mean| >> std`` merge without cancellation, and a rank with ``n_r = 0`` contributes
nothing (no NaN, whatever its mean and variance hold).

Design: one ``all_reduce`` (sum) of a ``(world, 3, C)`` buffer, zero except for this
rank's slot, gathers every rank's statistics; each rank then merges them locally with
:func:`normkit.functional.merge_moments` in the same order, so the merged statistics (and
the running averages derived from them) are bit-identical on every rank. ``all_reduce`` is
the one collective every backend and every supported torch version implements (gloo lacks
``reduce_scatter``; ``all_gather_into_tensor`` is deprecated in recent torch). The backward
is the adjoint: an ``all_reduce`` (sum) of the gradient of the gathered buffer, of which
each rank keeps its own slot, so gradients reach ``x`` on every rank and, through autograd,
the affine parameters and SN's logits (see ``docs/DISTRIBUTED.md`` for the loss scaling
that makes DDP's averaged gradients equal single-process ones).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from normkit._core import Moments, merge_moments

__all__ = ["all_merge_moments", "check_agreement"]


def _group_rank_and_size(process_group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "all_merge_moments needs an initialised torch.distributed default group, but "
            "torch.distributed.is_initialized() is False; call "
            "torch.distributed.init_process_group(...) first (or leave process_group=None on "
            "the layers for single-process use)"
        )
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process group "
            f"{process_group!r}; pass a group created by torch.distributed.new_group that "
            "contains this rank"
        )
    return rank, dist.get_world_size(process_group)


def _all_reduce(tensor: Tensor, op: Any, process_group: Any) -> None:
    """``dist.all_reduce`` whose failure (a peer that stopped answering ends in the process
    group's timeout) says what was being exchanged and what to check."""
    try:
        dist.all_reduce(tensor, op=op, group=process_group)
    except RuntimeError as error:
        raise RuntimeError(
            f"normkit: exchanging batch statistics across the {dist.get_world_size(process_group)} processes "
            "of the group failed. Every rank must run the same synced layers in the same order (a rank that "
            "crashed, skipped a layer or ran eval() leaves the others waiting until the process group's "
            f"timeout, init_process_group(timeout=...)). The collective said: {error}"
        ) from error


_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def check_agreement(num_channels: int, dtype: torch.dtype, device: torch.device, process_group: Any = None) -> None:
    """Raise on every rank unless every rank of ``process_group`` normalises ``num_channels``
    channels of the same ``dtype`` (exchanging statistics of different shapes would give
    garbage or abort). One small ``all_reduce``; layers run it on their first synced call."""
    rank, world = _group_rank_and_size(process_group)
    if world == 1:
        return
    code = _DTYPE_CODES.get(dtype, 0)
    extremes = torch.tensor([num_channels, -num_channels, code, -code], dtype=torch.int64, device=device)
    _all_reduce(extremes, dist.ReduceOp.MAX, process_group)
    most_c, least_c, most_d, least_d = (int(v) for v in extremes)
    if most_c != -least_c or most_d != -least_d:
        names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
        raise ValueError(
            "synchronised statistics need the same channel count and dtype on every rank of the process group: "
            f"rank {rank} has {num_channels} channels of {names.get(code, dtype)}, the group has channel counts "
            f"from {-least_c} to {most_c} and dtypes from {names.get(-least_d, '?')} to {names.get(most_d, '?')}; "
            "build the layer with the same num_features on every rank and feed every rank the same dtype"
        )


class _GatherSlots(torch.autograd.Function):
    """``(3, *S)`` local statistics -> ``(world, 3, *S)`` statistics of every rank."""

    @staticmethod
    def forward(ctx, local: Tensor, process_group: Any, rank: int, world: int) -> Tensor:  # type: ignore[override]
        gathered = local.new_zeros((world, *local.shape))
        gathered[rank] = local
        _all_reduce(gathered, dist.ReduceOp.SUM, process_group)
        ctx.process_group, ctx.rank = process_group, rank
        return gathered

    @staticmethod
    @once_differentiable  # double backward through a collective: refuse rather than be wrong
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Every rank's loss depends on every slot: this slot's gradient is the sum over ranks.
        grad = grad.contiguous().clone()
        _all_reduce(grad, dist.ReduceOp.SUM, ctx.process_group)
        return grad[ctx.rank], None, None, None


def all_merge_moments(m: Moments, process_group: Any = None) -> Moments:
    r"""Merge per-channel statistics exactly across the ranks of ``process_group``.

    Chan's parallel merge of every rank's ``(count, mean, biased var)``, one collective
    forward and one backward; differentiable with respect to ``mean`` and ``var``.

    Args:
        m: this rank's :class:`~normkit.functional.Moments`; ``count`` broadcasts to
            ``mean`` (e.g. the ``(1, C)`` result of ``merge_moments(m_in, 0)``). A rank with
            no samples passes ``count = 0`` (its mean and variance are ignored) and must
            still call, like every rank of the group.
        process_group: a ``torch.distributed`` process group containing this rank;
            ``None`` (default) or ``torch.distributed.group.WORLD`` for all ranks.

    Returns:
        :class:`~normkit.functional.Moments` over the union of all ranks' values, every
        field of ``mean``'s shape, identical on every rank; mean 0 and variance 0 where
        the total count is 0.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: this process is not in ``process_group``.

    Every rank must call with the same shape and dtype, and must run the backward when
    any rank does (the backward is a collective too), as with ``torch.nn.SyncBatchNorm``.

    Examples::

        >>> # in each of the processes started by torchrun, after init_process_group:
        >>> m = normkit.functional.merge_moments(normkit.functional.moments(x), 0)
        >>> total = all_merge_moments(m)  # statistics of the concatenated batch
    """
    rank, world = _group_rank_and_size(process_group)
    count = m.count.to(m.mean.dtype).expand_as(m.mean)
    # An empty rank's mean/var may be anything (even NaN); 0 * NaN would poison the merge.
    has_values = count > 0
    mean = torch.where(has_values, m.mean, 0.0)
    var = torch.where(has_values, m.var, 0.0).expand_as(mean)
    if world == 1:
        return Moments(count, mean, var)
    local = torch.stack((count, mean, var))
    gathered = _GatherSlots.apply(local, process_group, rank, world)
    merged = merge_moments(Moments(*gathered.unbind(1)), 0)
    return Moments(*(t.squeeze(0) for t in merged))
