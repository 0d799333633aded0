"""normkit's layers: drop-in batch, group, layer and instance norms, and Switchable Norm.

``registry`` is the one table of these layer kinds (:data:`KINDS`) that the model tools read.
"""

from normkit.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normkit.nn._base import NormModule
from normkit.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normkit.nn.norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from normkit.nn.registry import KINDS, NormKind, kind_named, kind_of
from normkit.nn.sparse_switchnorm import SparseSwitchNorm1d, SparseSwitchNorm2d, SparseSwitchNorm3d
from normkit.nn.switchnorm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d

__all__ = [
    "NormModule",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SparseSwitchNorm1d",
    "SparseSwitchNorm2d",
    "SparseSwitchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "KINDS",
    "NormKind",
    "kind_named",
    "kind_of",
]
