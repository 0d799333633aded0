"""normkit: Switchable Normalization and a drop-in family of normalization layers for PyTorch."""

from normkit import functional
from normkit._fused import get_backend, set_backend, use_backend
from normkit.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normkit.norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from normkit.switchnorm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d

__version__ = "0.1.0"

__all__ = [
    "functional",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "get_backend",
    "set_backend",
    "use_backend",
]
