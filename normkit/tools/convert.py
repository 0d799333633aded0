"""Swap the normalization layers of a model, and build one from its name.

:func:`convert` walks the module tree like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
and replaces batch / group / instance norms (``torch.nn`` or normkit, normkit SN too) by
another kind, carrying affine parameters, running statistics, device, dtype and training
flag. It never silently flattens a subclass with its own ``forward`` (e.g. timm's
``BatchNormAct2d``, timm issue #1254: converting it to SyncBN dropped the activation).

"layer" means the SN paper's Layer Norm for conv nets (Luo et al., ICLR 2019; Ba et al.,
2016): statistics over channels and positions per sample, per-channel affine, i.e.
``GroupNorm(1, C)``, not ``torch.nn.LayerNorm`` over trailing dims.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from normkit.nn.registry import CONVERTIBLE, KINDS, NORM_NAMES, NormKind, check_dim, dim_of, kind_named, kind_of

__all__ = ["create_norm", "convert", "NORM_NAMES"]


def create_norm(name: str, num_features: int, **kw: Any) -> nn.Module:
    """Build a normalization layer from its name (for configs and command lines).

    ============================  ==========================================================
    name                          layer
    ============================  ==========================================================
    ``"bn"``, ``"batch"``         :class:`normkit.BatchNorm{dim}d`
    ``"sn"``, ``"switch"``        :class:`normkit.SwitchNorm{dim}d`
    ``"gn"``, ``"group"``         :class:`normkit.GroupNorm` with ``num_groups`` (default: the
                                  largest divisor of ``num_features`` that is <= 32)
    ``"ln"``, ``"layer"``         ``normkit.GroupNorm(1, num_features)``: the SN paper's LN
                                  (per sample over channels and positions, per-channel affine)
    ``"in"``, ``"instance"``      :class:`normkit.InstanceNorm{dim}d`, ``affine=True`` by
                                  default (unlike torch), as SN's IN source
    ``"none"``, ``"identity"``    ``torch.nn.Identity()`` (for "no normalization" baselines)
    ============================  ==========================================================

    Names are case-insensitive; the kinds are the rows of :data:`normkit.nn.registry.KINDS`.

    Args:
        name: one of the names above.
        num_features: number of channels ``C``.
        dim: number of spatial dims (1, 2 or 3) for the batch / switch / instance classes.
            Default: 2.
        **kw: passed to the layer's constructor (``eps``, ``momentum``, ``sources``, ...).

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or a bad ``dim``.

    Examples::

        >>> import normkit
        >>> normkit.create_norm("sn", 64, sources=("in", "bn"))
        SwitchNorm2d(64, eps=1e-05, momentum=0.1, sources=('in', 'bn'), affine=True, track_running_stats=True)
        >>> normkit.create_norm("gn", 48)
        GroupNorm(24, 48, eps=1e-05, affine=True)
    """
    kind = kind_named(name)
    return kind.create(num_features, kw.pop("dim", 2), **kw)


# --------------------------------------------------------------------------------------------
# convert

TARGETS = tuple(kind.name for kind in KINDS if kind.convertible) + ("sync",)


def _known_base(module: nn.Module) -> Optional[type]:
    """The convertible class ``module`` is (or derives from), or None."""
    for cls in type(module).__mro__:
        if cls in CONVERTIBLE:
            return cls
    return None


def _running_kind(module: nn.Module) -> Optional[str]:
    """'bn' for per-channel population statistics, 'in' for torch's instance definition."""
    if getattr(module, "running_mean", None) is None:
        return None
    kind = kind_of(module)
    return "bn" if kind is None else kind.running  # a target class of no kind: taken as BN-like


def _factory_of(module: nn.Module) -> dict[str, Any]:
    for tensor in module.parameters(recurse=False):
        return {"device": tensor.device, "dtype": tensor.dtype}
    for tensor in module.buffers(recurse=False):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _carry(old: nn.Module, new: nn.Module) -> nn.Module:
    """Copy affine parameters, running statistics and flags from ``old`` to ``new``."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
        kind = _running_kind(old)
        if kind is not None and kind == _running_kind(new) and old.running_mean.shape == new.running_mean.shape:
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
            if old.num_batches_tracked is not None and new.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(old.num_batches_tracked)
    for flag in ("frozen", "process_group"):
        if hasattr(old, flag) and hasattr(new, flag) and getattr(old, flag) is not None:
            setattr(new, flag, getattr(old, flag))
    new.train(old.training)
    return new


def _constructor_kw(old: nn.Module, cls: Callable[..., nn.Module], options: dict[str, Any]) -> dict[str, Any]:
    """Options the new layer inherits from the old one (when its constructor takes them),
    overridden by the caller's ``options``."""
    inherited = dict(_factory_of(old), eps=old.eps)
    if hasattr(old, "momentum"):
        inherited["momentum"] = old.momentum
    if getattr(old, "axis", 1) != 1:
        inherited["axis"] = old.axis
    if hasattr(old, "affine"):
        inherited["affine"] = old.affine
    target = kind_of(cls) if isinstance(cls, type) else None
    if hasattr(old, "track_running_stats") and (target is None or target.running != "in"):
        # a layer without running statistics normalises with batch statistics in eval too; an
        # instance norm's running statistics are per-sample ones, which it keeps off by default
        inherited["track_running_stats"] = old.track_running_stats
    return dict(_taken_by(cls, inherited), **options)


def _taken_by(cls: Callable[..., Any], kw: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``kw`` that ``cls``'s constructor takes (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(cls).parameters
    open_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in kw.items() if open_kw or k in params}


def _num_features(module: nn.Module) -> int:
    return module.num_features if hasattr(module, "num_features") else module.num_channels  # torch.nn.GroupNorm's name


def _replace(old: nn.Module, target: Any, dim: Optional[int], options: dict[str, Any], process_group: Any) -> nn.Module:
    c = _num_features(old)
    layer_dim = check_dim(dim or dim_of(old) or 2)
    kind = kind_of(old)
    if target == "sync":
        if kind.running != "bn":
            return old  # only statistics over the batch are merged across processes
        new = old
        if not isinstance(old, kind.classes):  # a torch.nn layer: its normkit namesake takes a process group
            cls = kind.class_for(layer_dim)
            new = _carry(old, kind.create(c, layer_dim, **_constructor_kw(old, cls, options)))
        new.process_group = process_group
        return new
    if isinstance(target, NormKind):
        cls = target.class_for(layer_dim)
        if kind is target and type(old) is cls and not options and not target.rebuilds:
            return old  # already the requested kind
        new = target.create(c, layer_dim, **_constructor_kw(old, cls, options))
    elif isinstance(target, type):
        new = target(c, **_constructor_kw(old, target, options))
    else:
        new = target(c, **options)
    return _carry(old, new)


def convert(
    model: nn.Module,
    to: Union[str, type, Callable[..., nn.Module]],
    *,
    strict: bool = True,
    dim: Optional[int] = None,
    process_group: Any = None,
    **options: Any,
) -> nn.Module:
    """Replace the normalization layers of ``model`` by another kind, in place.

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``GroupNorm``,
    ``InstanceNorm1d/2d/3d`` and their normkit namesakes, and normkit ``SwitchNorm*d``.
    ``torch.nn.LayerNorm`` / ``normkit.LayerNorm`` (trailing-dims LN of transformers) are
    left alone.

    Targets:

    * ``"switch"``, ``"batch"``, ``"instance"``: normkit ``SwitchNorm / BatchNorm /
      InstanceNorm{dim}d``, dim from the old class (``BatchNorm3d`` -> 3), else ``dim`` (2).
    * ``"group"``: ``normkit.GroupNorm(num_groups, C)``, ``num_groups`` option or the
      largest divisor of C <= 32. ``"layer"``: ``normkit.GroupNorm(1, C)``, the SN paper's LN.
    * ``"sync"``: ``torch.nn`` batch norms become normkit batch norms, and every normkit
      batch / switch norm gets ``process_group`` (default ``torch.distributed.group.WORLD``,
      so ``torch.distributed`` must be initialised unless a group is passed).
    * a class, called as ``to(C, eps=..., momentum=..., device=..., dtype=..., **options)``,
      or any other callable, called as ``to(C, **options)``.

    Carried over (unless given in ``options``): ``eps``, ``momentum``, ``affine``,
    ``track_running_stats`` (except into an instance norm, where running statistics mean
    something else), ``axis``, ``frozen`` and ``process_group`` of normkit layers; and
    ``weight`` / ``bias`` (when both layers have them, shapes equal), running statistics when
    both layers define them the same way (per-channel population statistics: BN and SN's BN
    source; torch's per-sample instance statistics: IN with ``track_running_stats``), device,
    dtype, ``requires_grad`` and the training flag. A module seen at several paths is
    converted once and stays shared.

    Args:
        model: the network; returned as is, or the new layer if ``model`` itself is a norm.
        to: a target name from ``TARGETS``, a class or a factory.
        strict: raise on a subclass of a convertible class that defines its own ``forward``
            (converting it would drop behaviour, e.g. a fused activation). ``False`` leaves
            such modules unchanged instead. Default: True.
        dim: spatial dims for layers whose class does not say (GroupNorm, SyncBatchNorm).
            Default: None (2).
        process_group: for ``"sync"``. Default: None (``torch.distributed.group.WORLD``).
        **options: passed to the new layers' constructor (``sources=``, ``num_groups=``, ...).

    Raises:
        ValueError: unknown target name; a subclass with its own forward under ``strict``
            (the message names the module path); ``"sync"`` with no process group.

    Examples::

        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> normkit.convert(net, "switch")[1]
        SwitchNorm2d(8, eps=1e-05, momentum=0.1, sources=('in', 'ln', 'bn'), affine=True, track_running_stats=True)
    """
    if isinstance(to, str):
        name = to.lower()
        to = "sync" if name in ("sync", "syncbn") else kind_named(name)
        if to != "sync" and not to.convertible:
            raise ValueError(f"convert target must be one of {TARGETS}, a class or a factory, got {name!r}")
    elif not callable(to):
        raise ValueError(f"convert target must be one of {TARGETS}, a class or a factory, got {to!r}")
    if to == "sync" and process_group is None:
        process_group = torch.distributed.group.WORLD if torch.distributed.is_available() else None
        if process_group is None:
            raise ValueError(
                "convert(model, 'sync') needs a process group: call torch.distributed.init_process_group() "
                "first or pass process_group=..."
            )
    if dim is not None:
        check_dim(dim)
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module, path: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        base = _known_base(module)
        if base is not None:
            if type(module) is not base and type(module).forward is not base.forward:
                if strict:
                    raise ValueError(
                        f"convert: module '{path or '<root>'}' ({type(module).__name__}) subclasses "
                        f"{base.__name__} with its own forward; replacing it would drop that behaviour. "
                        "Convert it yourself, pass a factory, or pass strict=False to leave it unchanged"
                    )
                done[id(module)] = module
                return module
            new = _replace(module, to, dim, options, process_group)
        else:
            new = module
            for name, child in list(module._modules.items()):  # named_children() hides repeats
                if child is None:
                    continue
                converted = visit(child, f"{path}.{name}" if path else name)
                if converted is not child:
                    setattr(module, name, converted)
        done[id(module)] = new
        return new

    return visit(model, "")
