"""Population statistics of a trained model: recompute, freeze, reset.

* :func:`recompute_stats` is the "batch average" of Luo et al., "Differentiable
  Learning-to-Normalize via Switchable Normalization", ICLR 2019 (Sec. 3.2, Fig. 8: moving
  averages are unstable, so after training run K batches through the frozen network and set
  the BN statistics from them), GoMLX's ``batchnorm.UpdateAverages``, fvcore's
  ``update_bn_stats`` and ``torch.optim.swa_utils.update_bn``, for every normkit layer with
  running statistics and every ``torch.nn`` batch norm, with exact (Chan-merged) statistics
  of unequal batches, masks, custom batch formats and several processes.
* :func:`freeze_stats` / :func:`unfreeze_stats`: frozen averages that survive ``model.train()``
  (GoMLX ``FrozenAverages``, pytorch/pytorch#66073).
* :func:`reset_stats`: GoMLX ``ResetWeights``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from normkit._core import Moments, merge_moments, moments
from normkit.distributed import all_merge_moments
from normkit.nn._base import NormBase
from normkit.nn.registry import running_of

__all__ = ["RecomputeReport", "recompute_stats", "freeze_stats", "unfreeze_stats", "reset_stats"]


def _stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers with running statistics (of a registered kind), by module path."""
    return [(name or type(model).__name__, m) for name, m in model.named_modules() if running_of(m) is not None]


# --------------------------------------------------------------------------------------------
# recompute_stats


@dataclass
class RecomputeReport:
    """What :func:`recompute_stats` did.

    Attributes:
        batches: batches fed on this rank (fewer than ``num_batches`` for a short loader).
        samples: samples fed on this rank (leading dim of each batch's input; 0 if unknown).
        updated: module paths whose running statistics were set.
        unreached: module paths with running statistics that no batch reached (on any rank);
            their statistics are unchanged.
        frozen: module paths left alone because they are frozen.
    """

    batches: int
    samples: int
    updated: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"recompute_stats: {self.batches} batches ({self.samples} samples), "
            f"{len(self.updated)} layers updated"
        )
        if self.frozen:
            text += f", {len(self.frozen)} frozen left alone"
        if self.unreached:
            text += f"; {len(self.unreached)} never reached: {', '.join(self.unreached)}"
        return text


class _Accumulator:
    """Running Chan merge of the statistics one layer saw, in float64.

    Batch-norm kind: per-channel ``Moments`` over every valid (sample, position).
    Instance kind (torch's definition): each sample counts once; ``mean`` holds the averages
    of the per-sample means (first C entries) and unbiased variances (last C entries).
    """

    def __init__(self, module: nn.Module, instance_kind: bool) -> None:
        self.module = module
        self.instance_kind = instance_kind
        self.width = module.num_features
        width = module.num_features * (2 if instance_kind else 1)
        zeros = torch.zeros(1, width, dtype=torch.float64, device=module.running_mean.device)
        self.total = Moments(zeros, zeros, zeros)
        self.calls = 0

    def add(self, x: Tensor, mask: Optional[Tensor]) -> None:
        axis = getattr(self.module, "axis", 1)
        if not isinstance(x, Tensor) or x.dim() < 2 or not -x.dim() <= axis < x.dim() or x.shape[axis] != self.width:
            return  # not a batched input this layer accepts: its own forward raises the error
        # float64 from the start: the per-batch mean of a float32 batch is the largest error
        # source otherwise (1e-3 absolute at an offset of 1e4).
        m = moments(x.double(), axis, mask)
        self.calls += 1
        if self.instance_kind:
            # Samples with fewer than 2 valid positions have no variance estimate: skip them.
            ok = (m.count > 1).double()
            unbiased = m.var * m.count / (m.count - 1).clamp_min(1.0)
            m = Moments(ok, torch.cat([m.mean, unbiased], 1), torch.zeros_like(m.mean).repeat(1, 2))
        batch = merge_moments(m, 0)
        width = batch.mean.shape[1]
        stacked = Moments(
            torch.cat([self.total.count.expand(1, width), batch.count.expand(1, width)]),
            torch.cat([self.total.mean, batch.mean]),
            torch.cat([self.total.var, batch.var]),
        )
        self.total = merge_moments(stacked, 0)

    def all_merge(self, group: Any) -> None:
        count = self.total.count.expand_as(self.total.mean).contiguous()
        self.total = all_merge_moments(Moments(count, self.total.mean, self.total.var), group)

    def write(self) -> bool:
        """Set the layer's running statistics; False if it saw nothing."""
        count, mean, var = self.total.count.expand_as(self.total.mean), self.total.mean, self.total.var
        if not bool((count > 0).any()):
            return False
        module = self.module
        c = module.num_features
        if self.instance_kind:
            new_mean, new_var, ok = mean[0, :c], mean[0, c:], count[0, :c] > 0
        else:
            ok = count[0] > 1  # an unbiased variance needs two values
            new_mean, new_var = mean[0], var[0] * count[0] / (count[0] - 1).clamp_min(1.0)
        rm, rv = module.running_mean, module.running_var
        rm.copy_(torch.where(ok, new_mean, rm.double()).to(rm.dtype))
        rv.copy_(torch.where(ok, new_var, rv.double()).to(rv.dtype))
        return True


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"recompute_stats cannot feed a batch of type {type(batch).__name__} to the model; expected a "
        "tensor, a non-empty tuple/list (its first element is the input) or a dict (passed as **batch), "
        "or pass forward=lambda model, batch: ..."
    )


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 0
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, Tensor) and value.dim():
                return value.shape[0]
    return 0


def _distributed_group() -> Any:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def recompute_stats(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: Optional[int] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> RecomputeReport:
    r"""Set every running mean and variance to the exact population statistics of ``batches``.

    For each batch-norm-like layer (normkit ``BatchNorm*d``, ``SwitchNorm*d`` with a ``'bn'``
    source, ``torch.nn.BatchNorm*d`` / ``SyncBatchNorm``), over all valid values ``x`` it saw
    in the K batches (unequal batch sizes and masks weighted by element counts):

    .. math:: \text{running\_mean} = \frac{1}{n}\sum x, \qquad
              \text{running\_var} = \frac{1}{n-1}\sum (x - \text{running\_mean})^2

    computed by a float64 Chan merge of per-batch moments (no ``E[x^2] - E[x]^2``
    cancellation). Instance norms with running statistics (normkit or torch) follow
    ``torch.nn.InstanceNorm*d``'s definition: the average over all samples of each sample's
    mean and unbiased variance (samples with fewer than 2 valid positions are skipped).

    The whole model runs in ``eval()`` under ``no_grad`` (dropout off, the rest of the
    network fixed), except the layers being measured, which run in training mode with
    ``momentum=0`` so that they normalise with the batch's statistics (the paper's batch
    average: downstream layers see batch-normalised activations) and do not move their
    averages. Afterwards every module's training flag and momentum are restored, and each
    updated layer's ``num_batches_tracked`` is the number of calls it saw on this rank (as after
    ``torch.optim.swa_utils.update_bn``). Layers with ``frozen=True`` are left alone. When
    ``torch.distributed`` is initialised, every rank must call this; the statistics are merged
    exactly across ``torch.distributed.group.WORLD`` at the end (ranks may feed different
    numbers of batches, or none). During the pass each layer normalises with its rank's batch
    (normkit layers' ``process_group`` is switched off meanwhile); ``torch.nn.SyncBatchNorm``
    still synchronises in its forward, so with it every rank must feed the same number of
    batches.

    Args:
        model: the network (any ``nn.Module``).
        batches: any iterable of batches (a DataLoader, a list, a generator).
        num_batches: feed at most this many batches; a shorter iterable is fine (the report
            says how many were used). Default: None (all of them).
        forward: ``forward(model, batch)`` feeds one batch. Default: ``model(batch)`` for a
            tensor, ``model(batch[0])`` for a tuple/list, ``model(**batch)`` for a dict (so a
            ``mask`` key reaches a model that takes ``mask=``).

    Returns:
        :class:`RecomputeReport`: batches and samples used, layers updated, layers unreached.

    Raises:
        ValueError: ``num_batches < 1``, or no batch at all.

    Examples::

        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normkit.SwitchNorm2d(8))
        >>> loader = [torch.randn(4, 3, 8, 8) for _ in range(5)]
        >>> print(normkit.recompute_stats(net, loader, num_batches=3))
        recompute_stats: 3 batches (12 samples), 1 layers updated
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    feed = forward if forward is not None else _default_forward
    accumulators: dict[str, _Accumulator] = {}
    frozen: list[str] = []
    for name, module in _stat_layers(model):
        if getattr(module, "frozen", False):
            frozen.append(name)
        else:
            accumulators[name] = _Accumulator(module, running_of(module) == "in")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        module._normkit_accumulator.add(x, mask)

    modes = {m: m.training for m in model.modules()}
    saved = {
        acc.module: (acc.module.momentum, acc.module.num_batches_tracked.clone(), getattr(acc.module, "process_group", None))
        for acc in accumulators.values()
    }
    handles = []
    used = samples = 0
    try:
        model.eval()
        for acc in accumulators.values():
            acc.module.train()
            acc.module.momentum = 0.0
            if isinstance(acc.module, NormBase):
                # No per-batch collective: ranks may feed different numbers of batches, and the
                # accumulators are merged exactly at the end instead.
                acc.module.process_group = None
            acc.module._normkit_accumulator = acc
            handles.append(acc.module.register_forward_pre_hook(hook, with_kwargs=True))
        with torch.no_grad():
            limited = batches if num_batches is None else itertools.islice(batches, num_batches)
            for batch in limited:
                feed(model, batch)
                used += 1
                samples += _batch_size(batch)
        group = _distributed_group()
        if used == 0 and group is None:
            raise ValueError("recompute_stats got no batch: `batches` is empty; pass a non-empty iterable")
        report = RecomputeReport(used, samples, frozen=frozen)
        with torch.no_grad():
            for name, acc in accumulators.items():
                if group is not None:
                    acc.all_merge(group)  # every rank, every layer, same order
                (report.updated if acc.write() else report.unreached).append(name)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        for module, (momentum, tracked, process_group) in saved.items():
            module.momentum = momentum
            if isinstance(module, NormBase):
                module.process_group = process_group
            module.__dict__.pop("_normkit_accumulator", None)
            module.num_batches_tracked.copy_(tracked)
    for name in report.updated:
        accumulators[name].module.num_batches_tracked.fill_(accumulators[name].calls)
    return report


# --------------------------------------------------------------------------------------------
# freeze / unfreeze / reset


def _freeze_pre_hook(module: nn.Module, args: tuple) -> None:
    # torch.nn batch norms have no `frozen` flag: run this call in eval mode instead.
    if getattr(module, "frozen", False) and module.training:
        module._normkit_was_training = True
        module.training = False


def _freeze_post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    if module.__dict__.pop("_normkit_was_training", False):
        module.training = True


def _torch_hooks(module: nn.Module) -> list[tuple[dict, int]]:
    found = []
    for hooks, fn in ((module._forward_pre_hooks, _freeze_pre_hook), (module._forward_hooks, _freeze_post_hook)):
        found += [(hooks, key) for key, value in hooks.items() if value is fn]
    return found


def freeze_stats(model: nn.Module) -> nn.Module:
    """Freeze the running statistics of every layer that has them; survives ``model.train()``.

    A frozen layer normalises with its running averages and never updates them, in training
    too, while ``gamma`` / ``beta`` (and SN's logits) keep training: the fine-tuning case.
    normkit layers get ``frozen = True``; ``torch.nn`` batch / instance norms get
    ``frozen = True`` plus a forward pre-hook that runs each call in eval mode (removed by
    :func:`unfreeze_stats`). Layers without running statistics (GN, LN, SN without ``'bn'``)
    are unaffected.

    Returns:
        ``model`` (for chaining).

    Examples::

        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(4), normkit.BatchNorm1d(4))
        >>> net = normkit.freeze_stats(net).train()
        >>> net[1].frozen
        True
    """
    for _, module in _stat_layers(model):
        module.frozen = True
        if not isinstance(module, NormBase) and not _torch_hooks(module):
            module.register_forward_pre_hook(_freeze_pre_hook)
            module.register_forward_hook(_freeze_post_hook)
    return model


def unfreeze_stats(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_stats`: batch statistics and running updates in training again.

    Returns:
        ``model`` (for chaining).
    """
    for _, module in _stat_layers(model):
        module.frozen = False
        for hooks, key in _torch_hooks(module):
            del hooks[key]
        if not isinstance(module, NormBase):
            del module.frozen
    return model


def reset_stats(model: nn.Module) -> int:
    """Reset running statistics to mean 0, variance 1, no batch seen (GoMLX ``ResetWeights``).

    Frozen layers are left alone (unfreeze them first to reset them).

    Returns:
        The number of layers reset.
    """
    count = 0
    for _, module in _stat_layers(model):
        if not getattr(module, "frozen", False):
            module.reset_running_stats()
            count += 1
    return count
