"""The one table of normkit's layer kinds, which the model tools (``normkit.tools``) read.

A kind is one way of normalising: batch, switch, group, layer (the SN paper's: per sample over
channels and positions), instance or none. Its :class:`NormKind` row says which normkit
classes build it, which ``torch.nn`` classes behave like it, which running statistic it tracks
and how ``convert``, ``harden``, ``fuse``, ``recompute_stats`` and ``importance_report`` treat
it. Adding a normalizer means its layer file plus one row of :data:`KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from normkit.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normkit.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normkit.nn.norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from normkit.nn.sparse_switchnorm import SparseSwitchNorm1d, SparseSwitchNorm2d, SparseSwitchNorm3d
from normkit.nn.switchnorm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d

__all__ = [
    "NormKind",
    "KINDS",
    "NORM_NAMES",
    "CONVERTIBLE",
    "check_dim",
    "dim_of",
    "kind_for_source",
    "kind_named",
    "kind_of",
    "running_of",
]


def check_dim(dim: Any) -> int:
    """``dim`` if it is a number of spatial dims a by-dim class exists for (1, 2 or 3)."""
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (the number of spatial dims of (N, C, *S) inputs), got {dim!r}")
    return dim


@dataclass(frozen=True, eq=False)  # one object per kind: compared and hashed by identity
class NormKind:
    """One kind of normalization layer.

    Attributes:
        name: canonical name (a :func:`normkit.convert` target).
        aliases: every name :func:`kind_named` accepts (lower case, ``name`` included); the
            first two are the ones messages list.
        classes: the normkit classes it builds: one per spatial dim ``(1d, 2d, 3d)``, or one
            for every dim.
        torch_classes: the ``torch.nn`` classes ``convert`` replaces as this kind: the
            namesakes of ``classes`` first, in the same order (so they have its dims), then
            classes of any dim (``SyncBatchNorm``).
        alike: more types whose layers (subclasses too) are this kind but that ``convert``
            leaves alone (torch's private bases, e.g. lazy batch norms; trailing-dims LN).
        running: the running statistic it tracks: ``'bn'`` per channel over the batch (the
            statistics ``convert(model, "sync")`` merges across processes), ``'in'`` per
            sample (``torch.nn.InstanceNorm*d``'s definition), or None.
        source: the SwitchNorm source it equals, which ``harden`` turns a settled SN layer
            into (``'gn'`` stands for the ``'gnG'`` sources, ``num_groups=G``).
        switchable: learns importance weights over its ``sources`` (``mean_weights`` /
            ``var_weights``), which ``importance_report`` shows and ``harden`` reads.
        foldable: in eval a per-channel affine map, which ``fuse`` folds into the Conv /
            Linear before it.
        convertible: ``convert`` replaces layers of ``classes`` / ``torch_classes`` and takes
            ``name`` as a target.
        rebuilds: ``convert`` rebuilds a layer already of this kind rather than keeping it
            (group: converting sets the requested or default ``num_groups``).
        defaults: constructor defaults that differ from the class's.
        build: ``build(num_features, kw)`` where the constructor is not ``cls(num_features, **kw)``.
        accepts: for a class shared by kinds (GroupNorm), whether a layer of it is this kind.
    """

    name: str
    aliases: tuple[str, ...]
    classes: tuple[type, ...]
    torch_classes: tuple[type, ...] = ()
    alike: tuple[type, ...] = ()
    running: Optional[str] = None
    source: Optional[str] = None
    switchable: bool = False
    foldable: bool = False
    convertible: bool = True
    rebuilds: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    build: Optional[Callable[[int, dict[str, Any]], nn.Module]] = None
    accepts: Optional[Callable[[nn.Module], bool]] = None

    @property
    def types(self) -> tuple[type, ...]:
        """Every type whose instances (subclasses too) can be of this kind."""
        return self.classes + self.torch_classes + self.alike

    def class_for(self, dim: int = 2) -> type:
        """The class it builds for ``dim`` spatial dims (any dim for a single class)."""
        return self.classes[0] if len(self.classes) == 1 else self.classes[check_dim(dim) - 1]

    def create(self, num_features: int, dim: int = 2, **kw: Any) -> nn.Module:
        """A new layer of this kind over ``num_features`` channels; ``kw`` go to the constructor."""
        kw = {**self.defaults, **kw}
        if self.build is not None:
            return self.build(num_features, kw)
        return self.class_for(dim)(num_features, **kw)


def _divisor_at_most(num_channels: int, limit: int) -> int:
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    return max(g for g in range(1, min(limit, num_channels) + 1) if num_channels % g == 0)


def _group_norm(num_features: int, kw: dict[str, Any]) -> nn.Module:
    groups = kw.pop("num_groups", None)
    groups = _divisor_at_most(num_features, 32) if groups is None else groups
    return GroupNorm(groups, num_features, **kw)


def _one_group_norm(num_features: int, kw: dict[str, Any]) -> nn.Module:
    return GroupNorm(1, num_features, **kw)


def _one_group(layer: nn.Module) -> bool:
    return getattr(layer, "num_groups", 1) == 1


#: Every layer kind, in the order messages list them.
KINDS: tuple[NormKind, ...] = (
    NormKind(
        "batch", ("bn", "batch", "batchnorm"), (BatchNorm1d, BatchNorm2d, BatchNorm3d),
        torch_classes=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
        alike=(_TorchBatchNorm,), running="bn", source="bn", foldable=True,
    ),
    NormKind(
        "switch", ("sn", "switch", "switchnorm"), (SwitchNorm1d, SwitchNorm2d, SwitchNorm3d),
        running="bn", switchable=True,
    ),
    NormKind(
        "group", ("gn", "group", "groupnorm"), (GroupNorm,), torch_classes=(nn.GroupNorm,),
        source="gn", rebuilds=True, build=_group_norm, accepts=lambda layer: not _one_group(layer),
    ),
    NormKind(
        "layer", ("ln", "layer", "layernorm"), (GroupNorm,), torch_classes=(nn.GroupNorm,),
        alike=(LayerNorm, nn.LayerNorm), source="ln", build=_one_group_norm, accepts=_one_group,
    ),
    NormKind(
        "instance", ("in", "instance", "instancenorm"), (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d),
        torch_classes=(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), alike=(_TorchInstanceNorm,),
        running="in", source="in", defaults={"affine": True},  # affine by default (unlike torch), as SN's IN source
    ),
    NormKind("none", ("none", "identity"), (nn.Identity,), convertible=False),  # Identity takes and ignores any args
    NormKind(
        "sparse_switch", ("ssn", "sparse_switch", "sparseswitchnorm"),
        (SparseSwitchNorm1d, SparseSwitchNorm2d, SparseSwitchNorm3d), running="bn", switchable=True,
    ),
    NormKind(  # in eval a batch norm with its running statistics: it fuses like one
        "batch_renorm", ("brn", "batch_renorm", "batchrenorm", "renorm"),
        (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d), running="bn", foldable=True,
    ),
)

#: Names accepted by :func:`normkit.create_norm` (aliases of the same kind are listed together).
NORM_NAMES = tuple("/".join(kind.aliases[:2]) for kind in KINDS)

#: The classes :func:`normkit.convert` replaces (a subclass is converted as its class here).
CONVERTIBLE = tuple(dict.fromkeys(cls for kind in KINDS if kind.convertible for cls in kind.classes + kind.torch_classes))

_DIMS = {
    cls: dim
    for kind in KINDS
    if len(kind.classes) == 3
    for family in (kind.classes, kind.torch_classes)
    for dim, cls in enumerate(family[:3], 1)
}


def kind_named(name: str) -> NormKind:
    """The kind called ``name`` (any of its aliases, case-insensitive).

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    if isinstance(name, str):
        for kind in KINDS:
            if name.lower() in kind.aliases:
                return kind
    raise ValueError(f"unknown normalization name {name!r}; valid names are {', '.join(NORM_NAMES)}")


def kind_of(layer: Union[nn.Module, type]) -> Optional[NormKind]:
    """The kind of a layer (normkit or ``torch.nn``, subclasses too), or None for other modules.

    A class shared by kinds gives the first kind for the class itself and the matching one
    for a layer: ``GroupNorm(1, C)`` is ``layer``, other GroupNorms are ``group``.
    """
    is_class = isinstance(layer, type)
    cls = layer if is_class else type(layer)
    for kind in KINDS:
        if issubclass(cls, kind.types) and (is_class or kind.accepts is None or kind.accepts(layer)):
            return kind
    return None


def dim_of(layer: nn.Module) -> Optional[int]:
    """The spatial dims the layer's class is for (``BatchNorm3d``: 3), or None where the class
    does not say (GroupNorm, SyncBatchNorm, other modules)."""
    return next((_DIMS[cls] for cls in type(layer).__mro__ if cls in _DIMS), None)


def running_of(layer: nn.Module) -> Optional[str]:
    """The running statistic ``layer`` holds (its kind's ``running``), or None when it holds
    none (``track_running_stats=False``, SN without ``'bn'``) or is of no kind."""
    kind = kind_of(layer)
    if kind is None or getattr(layer, "running_mean", None) is None:
        return None
    return kind.running


def kind_for_source(source: str) -> tuple[NormKind, dict[str, Any]]:
    """The kind a (parsed) SwitchNorm source equals and the options that build it:
    ``'bn'`` -> (batch, {}), ``'gn4'`` -> (group, ``{"num_groups": 4}``)."""
    family = source.rstrip("0123456789")
    for kind in KINDS:
        if kind.source == family:
            return kind, ({"num_groups": int(source[len(family):])} if family != source else {})
    raise ValueError(f"no layer kind equals the SwitchNorm source {source!r}")
