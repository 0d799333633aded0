"""The one table of normkit layers that the generic checks run over (torch's
``common_modules.py`` is the model): how to build each layer, a sample input shape, the
statistic sources its float64 reference (``reference.py``) mixes, and what it supports.
Adding a normalizer means adding its rows here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

import normkit


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple
    sources: tuple = ("bn",)
    axis: int = 1
    groups: Optional[int] = None
    extra: dict = field(default_factory=dict)
    masks: bool = True  # takes forward(x, mask=...)
    functional: Optional[Callable] = None  # (module, x) -> y through normkit.functional

    @property
    def running(self) -> Optional[str]:
        """Which running statistic the layer tracks when asked: 'bn', 'in' or None."""
        if "bn" in self.sources:
            return "bn"
        return "in" if self.sources == ("in",) else None

    def __str__(self) -> str:
        return self.name


def _sn(cls, c, **kw):
    return lambda: cls(c, **kw)


CASES = [
    Case("sn1d-2d", _sn(normkit.SwitchNorm1d, 5), (6, 5), ("in", "ln", "bn")),
    Case("sn1d-3d", _sn(normkit.SwitchNorm1d, 4), (3, 4, 7), ("in", "ln", "bn")),
    Case("sn2d", _sn(normkit.SwitchNorm2d, 6), (4, 6, 3, 5), ("in", "ln", "bn")),
    Case("sn2d-gn", _sn(normkit.SwitchNorm2d, 6, sources=("in", "ln", "bn", "gn3")), (3, 6, 2, 3), ("in", "ln", "bn", "gn3")),
    Case("sn2d-inln", _sn(normkit.SwitchNorm2d, 4, sources=("in", "ln")), (2, 4, 3, 3), ("in", "ln")),
    Case("sn2d-L1", _sn(normkit.SwitchNorm2d, 4), (5, 4, 1, 1), ("in", "ln", "bn")),
    Case("sn2d-N1", _sn(normkit.SwitchNorm2d, 4), (1, 4, 3, 2), ("in", "ln", "bn")),
    Case("sn2d-last", _sn(normkit.SwitchNorm2d, 4, axis=-1), (3, 2, 5, 4), ("in", "ln", "bn"), axis=3),
    Case("sn3d", _sn(normkit.SwitchNorm3d, 3), (2, 3, 2, 3, 2), ("in", "ln", "bn")),
    Case("bn1d", _sn(normkit.BatchNorm1d, 5), (7, 5)),
    Case("bn1d-3d", _sn(normkit.BatchNorm1d, 3), (4, 3, 6)),
    Case("bn2d", _sn(normkit.BatchNorm2d, 4), (3, 4, 5, 2)),
    Case("bn2d-last", _sn(normkit.BatchNorm2d, 4, axis=-1), (3, 5, 2, 4), axis=3),
    Case("bn3d", _sn(normkit.BatchNorm3d, 2), (2, 2, 3, 2, 2)),
    Case("gn", lambda: normkit.GroupNorm(2, 6), (3, 6, 4), ("gn2",)),
    Case("gn2d", lambda: normkit.GroupNorm(3, 6), (2, 6, 3, 3), ("gn3",)),
    Case("in1d", lambda: normkit.InstanceNorm1d(3, affine=True), (2, 3, 5), ("in",)),
    Case("in2d", lambda: normkit.InstanceNorm2d(3, affine=True), (2, 3, 4, 4), ("in",)),
    Case("in3d", lambda: normkit.InstanceNorm3d(2, affine=True), (2, 2, 3, 2, 2), ("in",)),
]

# LayerNorm normalises trailing dims; it is checked with its own reference (torch.nn.LayerNorm).
LAYER_NORM_CASES = [
    Case("ln", lambda: normkit.LayerNorm((3, 4)), (2, 5, 3, 4), ("in",)),
    Case("ln-1d", lambda: normkit.LayerNorm(6), (4, 6), ("in",)),
]
