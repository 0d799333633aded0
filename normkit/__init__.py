"""normkit: Switchable Normalization and a drop-in family of normalization layers for PyTorch.

Layers, bottom to top (imports only go down): ``normkit._core`` (maths) ->
``normkit.kernels`` (kernel sets and the torch operators) -> ``normkit.functional`` (ops and
the dispatcher) -> ``normkit.nn`` (layers) -> ``normkit.tools`` (model tools).
"""

from normkit import functional
from normkit.kernels import get_backend, set_backend, use_backend
from normkit.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    SparseSwitchNorm1d,
    SparseSwitchNorm2d,
    SparseSwitchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    NormModule,
)
from normkit.tools.convert import ConvertReport, convert, create_norm, norm_act_converter, register_converter
from normkit.tools.deploy import FuseReport, fuse, fuse_conv_bn, harden
from normkit.tools.importance import ImportanceReport, importance_report, plot_importance, source_colour
from normkit.tools.official import load_official_switchnorm, official_sources
from normkit.tools.stats import RecomputeReport, freeze_stats, recompute_stats, reset_stats, unfreeze_stats
from normkit.tools.ws import WSConv2d, weight_standardization

__version__ = "0.1.0"

__all__ = [
    "functional",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SparseSwitchNorm1d",
    "SparseSwitchNorm2d",
    "SparseSwitchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
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
    "NormModule",
    "convert",
    "ConvertReport",
    "register_converter",
    "norm_act_converter",
    "create_norm",
    "importance_report",
    "ImportanceReport",
    "plot_importance",
    "source_colour",
    "weight_standardization",
    "WSConv2d",
    "harden",
    "fuse",
    "FuseReport",
    "fuse_conv_bn",
    "load_official_switchnorm",
    "official_sources",
]
