"""The maths of every normkit layer, with no knowledge of kernels, layers or processes.

Data path: ``x -> moments`` (per-(sample, channel) count, mean, biased variance) ``->
sources`` (IN, LN, BN, GN as exact Chan merges of those moments) ``-> mix`` (a frozen
:class:`MixSpec` plus importance weights give ``mu``, ``scale``, ``shift``) ``-> apply``
(``(x - mu) * scale + shift``). Nothing here imports anything of normkit above it.
"""

from normkit._core.checks import (
    InputError,
    UnsupportedDtypeError,
    check_eps,
    check_float_input,
    check_momentum,
    check_param_dtypes,
    check_per_channel,
    check_vector,
    check_weights,
)
from normkit._core.moments import (
    Moments,
    broadcast_mask,
    expand_stat,
    mask_for,
    merge_moments,
    moments,
    normalize_axis,
    reduce_dims,
    stat_dtype,
    sum_positions,
)
from normkit._core.sources import VALID_SOURCES_TEXT, parse_sources, source_code, source_moments
from normkit._core.sparsestmax import max_radius, sparsemax, sparsestmax, sparsestmax_weights
from normkit._core.spec import (
    MixSpec,
    RenormSpec,
    SoftmaxMixSpec,
    apply_affine,
    mix,
    renorm_correction,
    spec_from_codes,
    update_running,
)
from normkit._core.weights import softmax_weights

__all__ = [
    "InputError",
    "UnsupportedDtypeError",
    "Moments",
    "MixSpec",
    "RenormSpec",
    "SoftmaxMixSpec",
    "VALID_SOURCES_TEXT",
    "apply_affine",
    "broadcast_mask",
    "check_eps",
    "check_float_input",
    "check_momentum",
    "check_param_dtypes",
    "check_per_channel",
    "check_vector",
    "check_weights",
    "expand_stat",
    "mask_for",
    "merge_moments",
    "max_radius",
    "mix",
    "moments",
    "normalize_axis",
    "parse_sources",
    "reduce_dims",
    "renorm_correction",
    "source_code",
    "sparsemax",
    "sparsestmax",
    "sparsestmax_weights",
    "softmax_weights",
    "source_moments",
    "spec_from_codes",
    "stat_dtype",
    "sum_positions",
    "update_running",
]
