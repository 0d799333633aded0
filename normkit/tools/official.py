"""Load checkpoints written by the official Switchable Normalization code.

The official PyTorch code (github.com/switchablenorms/Switchable-Normalization, released
with Luo et al., ICLR 2019, and its ImageNet ResNet-50 weights) stores per SN layer, as read
from its public description (no code copied, the repository is CC-BY-NC):

=========================  ==================  ===========================================
official key               shape               normkit key / shape
=========================  ==================  ===========================================
``weight``, ``bias``       ``(1, C, 1, 1)``    same names, ``(C,)``
                           (``(1, C)`` in 1d)
``mean_weight``            ``(K,)``            ``mean_logits`` ``(K,)`` (same meaning: the
``var_weight``             ``(K,)``            softmax is taken over them), ``var_logits``
``running_mean``           ``(1, C, 1)``       ``running_mean`` / ``running_var`` ``(C,)``
``running_var``            (``running_mean_bn`` / ``running_var_bn``, ``(1, C)``, in 1d)
=========================  ==================  ===========================================

with the sources in the order ``('in', 'ln', 'bn')`` (K = 3), ``('in', 'ln')`` for
``using_bn=False`` layers (K = 2, no running statistics) and ``('ln', 'bn')`` for the 1d
layer (K = 2 with running statistics). ``num_batches_tracked`` is absent and filled in by
normkit's loader.

Conventions to mind: the official ``momentum`` (0.9 / 0.997) is the weight of the *old*
value, so it is ``1 - momentum`` here (0.1 / 0.003); its running variance was averaged from
a BN variance that mixes unbiased per-(n, c) variances, slightly larger than normkit's for
small feature maps (``running_var`` is a starting point: :func:`normkit.recompute_stats`
gives exact population statistics in a few batches).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

from torch import Tensor

__all__ = ["load_official_switchnorm", "official_sources"]

_RUNNING = (("running_mean", "running_mean"), ("running_var", "running_var"),
            ("running_mean_bn", "running_mean"), ("running_var_bn", "running_var"))


def _sn_prefixes(state: Mapping[str, Any]) -> list[str]:
    return [key[: -len("mean_weight")] for key in state if key.endswith("mean_weight") and
            key[: -len("mean_weight")] + "var_weight" in state]


def official_sources(state_dict: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The normkit ``sources`` each official SN layer needs, by module path.

    Args:
        state_dict: an official checkpoint (as for :func:`load_official_switchnorm`).

    Returns:
        ``{module_path: sources}``, e.g. ``{"layer1.0.sn1": ("in", "ln", "bn")}``.
    """
    state = _unwrap(state_dict, "module.")
    out = {}
    for prefix in _sn_prefixes(state):
        k = state[prefix + "mean_weight"].numel()
        has_running = any(prefix + old in state for old, _ in _RUNNING)
        out[prefix.rstrip(".")] = ("in", "ln", "bn") if k == 3 else ("ln", "bn") if has_running else ("in", "ln")
    return out


def _unwrap(state_dict: Mapping[str, Any], strip_prefix: str) -> "OrderedDict[str, Any]":
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]  # the official training script saves {"state_dict": ..., ...}
    out: "OrderedDict[str, Any]" = OrderedDict()
    for key, value in state_dict.items():
        out[key[len(strip_prefix):] if strip_prefix and key.startswith(strip_prefix) else key] = value
    return out


def _per_channel(key: str, value: Tensor, c: int) -> Tensor:
    if value.numel() != c or value.dim() < 1 or value.shape[1 if value.dim() > 1 else 0] != c:
        raise ValueError(
            f"official checkpoint key {key!r}: expected C={c} values shaped (1, C, 1, 1), (1, C, 1) or (1, C), "
            f"got shape {tuple(value.shape)}"
        )
    return value.reshape(c).clone()


def load_official_switchnorm(state_dict: Mapping[str, Any], *, strip_prefix: str = "module.") -> "OrderedDict[str, Tensor]":
    """Convert an official SN checkpoint into a normkit state dict.

    SN layers are found by their ``mean_weight`` / ``var_weight`` pair; their keys are
    renamed and reshaped as in the module docstring, every other key (convolutions, the
    classifier, ...) is passed through. A ``{"state_dict": ...}`` wrapper and a
    DataParallel ``module.`` prefix are removed.

    Args:
        state_dict: the official checkpoint (``torch.load(path, map_location="cpu")``).
        strip_prefix: prefix removed from every key. Default: ``"module."``.

    Returns:
        A state dict for the same network built with normkit ``SwitchNorm*d`` layers whose
        ``sources`` match (:func:`official_sources`): ``model.load_state_dict(result)``.

    Raises:
        ValueError: an SN layer whose weights are not 1-D with 2 or 3 entries, or whose
            affine / running tensors do not hold C values.

    Examples::

        >>> import torch, normkit
        >>> official = {"sn.weight": torch.ones(1, 4, 1, 1), "sn.bias": torch.zeros(1, 4, 1, 1),
        ...             "sn.mean_weight": torch.ones(3), "sn.var_weight": torch.ones(3),
        ...             "sn.running_mean": torch.zeros(1, 4, 1), "sn.running_var": torch.ones(1, 4, 1)}
        >>> sorted(normkit.load_official_switchnorm(official))
        ['sn.bias', 'sn.mean_logits', 'sn.running_mean', 'sn.running_var', 'sn.var_logits', 'sn.weight']
    """
    state = _unwrap(state_dict, strip_prefix)
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    renamed: dict[str, str] = {}
    for prefix in _sn_prefixes(state):
        mean_w, var_w = state[prefix + "mean_weight"], state[prefix + "var_weight"]
        if mean_w.dim() != 1 or mean_w.numel() not in (2, 3) or var_w.shape != mean_w.shape:
            raise ValueError(
                f"official checkpoint layer {prefix.rstrip('.')!r}: expected mean_weight and var_weight of shape "
                f"(3,) or (2,), got {tuple(mean_w.shape)} and {tuple(var_w.shape)}"
            )
        renamed[prefix + "mean_weight"] = prefix + "mean_logits"
        renamed[prefix + "var_weight"] = prefix + "var_logits"
        weight = state.get(prefix + "weight")
        c = weight.numel() if weight is not None else state[prefix + "running_mean"].numel()
        for name in ("weight", "bias"):
            if prefix + name in state:
                state[prefix + name] = _per_channel(prefix + name, state[prefix + name], c)
        for old, new in _RUNNING:
            if prefix + old in state:
                state[prefix + old] = _per_channel(prefix + old, state[prefix + old], c)
                renamed[prefix + old] = prefix + new
    for key, value in state.items():
        out[renamed.get(key, key)] = value
    return out
