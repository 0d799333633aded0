"""The one table of normkit layers that the generic checks run over (torch's
``common_modules.py`` is the model): how to build each layer, a sample input shape, the
statistic sources its float64 reference (``reference.py``) mixes, and what it supports.

Adding a normalizer means adding its rows here. Every check derives its parameters from the
table: the core checks run each row as written (:data:`CASES`); the masks, kernels,
stats-tool, sync and property checks rebuild each layer configuration (:func:`variants`) at
their own channel count, rank and axis with :meth:`Case.build`, selecting what they can run
with :func:`cases` / :func:`variants` filters (``running='bn'``, ``sync=True``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

import normkit

# kind -> the normkit class for 0/1, 2 and 3 spatial dims (one class: every rank)
_CLASSES = {
    "bn": (normkit.BatchNorm1d, normkit.BatchNorm2d, normkit.BatchNorm3d),
    "sn": (normkit.SwitchNorm1d, normkit.SwitchNorm2d, normkit.SwitchNorm3d),
    "in": (normkit.InstanceNorm1d, normkit.InstanceNorm2d, normkit.InstanceNorm3d),
    "gn": (normkit.GroupNorm,),
    "ln": (normkit.LayerNorm,),
    "ssn": (normkit.SparseSwitchNorm1d, normkit.SparseSwitchNorm2d, normkit.SparseSwitchNorm3d),
    "brn": (normkit.BatchRenorm1d, normkit.BatchRenorm2d, normkit.BatchRenorm3d),
}
_DEFAULT_SOURCES = {"bn": ("bn",), "sn": ("in", "ln", "bn"), "in": ("in",), "ln": ("in",), "ssn": ("in", "ln", "bn"),
                    "brn": ("bn",)}


@dataclass
class Case:
    name: str
    kind: str  # 'bn', 'sn', 'gn', 'in', 'ln' (trailing dims; its own reference), 'ssn' or 'brn'
    # (ssn: SN with sparsestmax weights, the reference reads them from the layer; brn: in its
    # warm-up, where its outputs and gradients are batch norm's)
    shape: tuple  # a sample input
    sources: tuple = ()  # the statistics the reference mixes; () = the kind's (SN: its default)
    axis: int = 1  # the channel axis the layer is built with (-1: channels-last)
    groups: Optional[int] = None  # GroupNorm's num_groups
    extra: dict = field(default_factory=dict)  # more constructor arguments (LN: normalized_shape)
    masks: bool = True  # takes forward(x, mask=...)
    functional: Optional[Callable] = None  # (module, x) -> y through normkit.functional

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = (f"gn{self.groups}",) if self.kind == "gn" else _DEFAULT_SOURCES[self.kind]

    # ---- what it supports -----------------------------------------------------------------

    @property
    def running(self) -> Optional[str]:
        """Which running statistic the layer tracks when asked: 'bn', 'in' or None."""
        if self.kind == "brn":  # its running statistics move by the paper's rule, which the
            return None  # reference does not model: test_batch_renorm.py checks them
        if self.kind in ("bn", "sn", "ssn"):
            return "bn" if "bn" in self.sources else None
        return "in" if self.kind == "in" else None

    @property
    def tracking(self) -> bool:
        """The row's own layer (``make()``) keeps running statistics."""
        return self.running is not None and self.extra.get("track_running_stats", self.running == "bn")

    @property
    def sync(self) -> bool:
        """Takes ``process_group=`` (synchronised batch statistics)."""
        return self.kind in ("bn", "sn", "ssn", "brn")

    @property
    def channels_axis(self) -> bool:
        """Takes ``axis=`` (any channel axis, channels-last included)."""
        return self.kind != "ln"

    @property
    def dim(self) -> int:
        """Spatial dims of the sample input."""
        return len(self.shape) - 2

    def fits(self, c: int) -> bool:
        """Can be built with ``c`` channels (every group count divides it)."""
        return all(c % g == 0 for g in self._group_counts())

    def channels(self, prefer: int) -> int:
        """``prefer`` if the layer can be built with that many channels, else the least multiple
        of it that every group count divides."""
        return math.lcm(prefer, *self._group_counts())

    def _group_counts(self) -> list[int]:
        return [int(s[2:]) for s in self.sources if s.startswith("gn")]

    @property
    def variant(self) -> str:
        """The layer configuration without shape or axis: 'sn', 'sn-in-ln', 'sn-no-affine', 'gn2', ...
        Rows with the same variant build the same layer at different sizes."""
        if self.kind == "gn":
            label = f"gn{self.groups}"
        elif self.kind in ("sn", "ssn") and self.sources != _DEFAULT_SOURCES["sn"]:
            label = f"{self.kind}-" + "-".join(self.sources)
        else:
            label = self.kind
        flags = [k if v is True else f"no-{k}" if v is False else f"{k}={v}"
                 for k, v in sorted(self.extra.items()) if k != "normalized_shape"]
        return "-".join([label, *flags])

    # ---- building -------------------------------------------------------------------------

    def build(self, c: Optional[int] = None, dim: Optional[int] = None, axis: Optional[int] = None,
              *, tracking: bool = False, **kw: Any) -> nn.Module:
        """This configuration with ``c`` channels for inputs with ``dim`` spatial dims and the
        channels on ``axis`` (defaults: the row's own); ``tracking`` asks for running
        statistics where the layer keeps them only when asked (instance norm); ``kw``: more
        constructor arguments (``process_group``, ``dtype``, ...)."""
        c = self.shape[self.axis] if c is None else c
        dim = self.dim if dim is None else dim
        axis = self.axis if axis is None else axis
        classes = _CLASSES[self.kind]
        cls = classes[min(max(dim, 1), len(classes)) - 1]
        args = {**self.extra, **kw}
        if axis != 1:
            args["axis"] = axis
        if self.kind in ("sn", "ssn"):
            args["sources"] = self.sources
        if tracking and self.running == "in":
            args["track_running_stats"] = True
        if self.kind == "gn":
            return cls(self.groups, c, **args)
        if self.kind == "ln":
            return cls(**args)
        return cls(c, **args)

    def make(self, **kw: Any) -> nn.Module:
        """The row's own layer (``kw``: constructor overrides)."""
        return self.build(**kw)

    def __str__(self) -> str:
        return self.name


_SSN_SPHERE = {"radius_steps": None, "radius": 0.45}  # most random logits take the sphere branch
# SSN rows say masks=False only because reference.of_layer / from_params mix with the softmax
# of the logits; tests/test_sparse_switch_norm.py checks SSN's masks against its own weights.

CASES = [
    Case("sn1d-2d", "sn", (6, 5)),
    Case("sn1d-3d", "sn", (3, 4, 7)),
    Case("sn2d", "sn", (4, 6, 3, 5)),
    Case("sn2d-gn", "sn", (3, 6, 2, 3), ("in", "ln", "bn", "gn3")),
    Case("sn1d-gn2", "sn", (3, 4, 5), ("in", "ln", "bn", "gn2")),
    Case("sn2d-inln", "sn", (2, 4, 3, 3), ("in", "ln")),
    Case("sn2d-bn-gn2", "sn", (3, 4, 2, 3), ("bn", "gn2")),
    Case("sn1d-ln", "sn", (3, 4, 5), ("ln",)),
    Case("sn1d-in-bn", "sn", (3, 4, 5), ("in", "bn")),
    Case("sn2d-no-affine", "sn", (3, 4, 2, 3), extra={"affine": False}),
    Case("sn2d-L1", "sn", (5, 4, 1, 1)),
    Case("sn2d-N1", "sn", (1, 4, 3, 2)),
    Case("sn2d-last", "sn", (3, 2, 5, 4), axis=-1),
    Case("sn3d", "sn", (2, 3, 2, 3, 2)),
    Case("bn1d", "bn", (7, 5)),
    Case("bn1d-3d", "bn", (4, 3, 6)),
    Case("bn2d", "bn", (3, 4, 5, 2)),
    Case("bn2d-last", "bn", (3, 5, 2, 4), axis=-1),
    Case("bn3d", "bn", (2, 2, 3, 2, 2)),
    Case("gn", "gn", (3, 6, 4), groups=2),
    Case("gn2d", "gn", (2, 6, 3, 3), groups=3),
    Case("in1d", "in", (2, 3, 5), extra={"affine": True}),
    Case("in2d", "in", (2, 3, 4, 4), extra={"affine": True}),
    Case("in3d", "in", (2, 2, 3, 2, 2), extra={"affine": True}),
    # fixed radii (no schedule): each call is the same function of its inputs
    Case("ssn2d-sphere", "ssn", (4, 6, 3, 5), extra=_SSN_SPHERE, masks=False),
    Case("ssn1d-gn2", "ssn", (3, 4, 5), ("in", "ln", "bn", "gn2"), extra=_SSN_SPHERE, masks=False),
    Case("ssn1d-sparsemax", "ssn", (6, 5), extra={"radius_steps": None}, masks=False),
    Case("ssn2d-one-hot", "ssn", (3, 4, 2, 3), extra={"radius_steps": None, "radius": 1.0}, masks=False),
    Case("ssn2d-last", "ssn", (3, 2, 5, 4), axis=-1, extra=_SSN_SPHERE, masks=False),
    Case("ssn3d", "ssn", (2, 3, 2, 3, 2), extra=_SSN_SPHERE, masks=False),
    Case("brn1d", "brn", (7, 5)),
    Case("brn2d", "brn", (3, 4, 5, 2)),
    Case("brn2d-last", "brn", (3, 5, 2, 4), axis=-1),
    Case("brn3d", "brn", (2, 2, 3, 2, 2)),
]

# LayerNorm normalises trailing dims; it is checked with its own reference (torch.nn.LayerNorm).
LAYER_NORM_CASES = [
    Case("ln", "ln", (2, 5, 3, 4), extra={"normalized_shape": (3, 4)}),
    Case("ln-1d", "ln", (4, 6), extra={"normalized_shape": 6}),
]


def _matches(case: Case, want: dict) -> bool:
    for key, value in want.items():
        if key == "kind":
            ok = case.kind in ((value,) if isinstance(value, str) else value)
        elif key == "fits":
            ok = case.fits(value)
        elif key == "running" and value is True:
            ok = case.running is not None
        elif key == "source":
            ok = value in case.sources
        else:
            ok = getattr(case, key) == value
        if not ok:
            return False
    return True


def cases(table: Optional[list] = None, **want: Any) -> list[Case]:
    """The rows of ``table`` (default :data:`CASES`) with every attribute in ``want``:
    ``kind`` (one or a tuple), ``running`` ('bn', 'in', None, or True for any), ``tracking``,
    ``sync``, ``masks``, ``channels_axis``, ``source`` (among its sources), ``fits`` (a channel
    count), ``dim``."""
    return [c for c in (CASES if table is None else table) if _matches(c, want)]


def variants(table: Optional[list] = None, **want: Any) -> list[Case]:
    """One row per layer configuration (the first of each :attr:`Case.variant`), filtered as
    :func:`cases`: what checks that build layers at their own sizes run over."""
    seen: dict[str, Case] = {}
    for c in cases(table, **want):
        seen.setdefault(c.variant, c)
    return list(seen.values())


def variant(name: str) -> Case:
    """The row that stands for the configuration called ``name``."""
    return next(c for c in variants() if c.variant == name)


#: torch.nn class -> the normkit class that subclasses and replaces it. Every torch ModuleInfo
#: sample of these classes (``torch.testing._internal.common_modules.module_db``) runs through
#: the normkit class in ``test_torch_modules.py``.
TORCH_NAMESAKES = {
    nn.BatchNorm1d: normkit.BatchNorm1d,
    nn.BatchNorm2d: normkit.BatchNorm2d,
    nn.BatchNorm3d: normkit.BatchNorm3d,
    nn.GroupNorm: normkit.GroupNorm,
    nn.LayerNorm: normkit.LayerNorm,
    nn.InstanceNorm1d: normkit.InstanceNorm1d,
    nn.InstanceNorm2d: normkit.InstanceNorm2d,
    nn.InstanceNorm3d: normkit.InstanceNorm3d,
}
