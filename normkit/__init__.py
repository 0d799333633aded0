"""normkit: Switchable Normalization and a drop-in family of normalization layers for PyTorch."""

from normkit import functional
from normkit._fused import get_backend, set_backend, use_backend
from normkit.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normkit.norms import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm
from normkit.switchnorm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from normkit.convert import convert, create_norm
from normkit.importance import ImportanceReport, importance_report, plot_importance
from normkit.ws import WSConv2d, weight_standardization
from normkit.deploy import fuse, fuse_conv_bn, harden
from normkit.official import load_official_switchnorm, official_sources
from normkit.stats import RecomputeReport, freeze_stats, recompute_stats, reset_stats, unfreeze_stats

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
    "recompute_stats",
    "RecomputeReport",
    "freeze_stats",
    "unfreeze_stats",
    "reset_stats",
    "convert",
    "create_norm",
    "importance_report",
    "ImportanceReport",
    "plot_importance",
    "weight_standardization",
    "WSConv2d",
    "harden",
    "fuse",
    "fuse_conv_bn",
    "load_official_switchnorm",
    "official_sources",
]
