"""Means and 95% intervals over seeds, from the Student t distribution (no scipy needed).

With ``n`` seeds the interval of a mean is ``mean +- t(0.975, n - 1) * sd / sqrt(n)``; the
interval of a difference between two normalizers (or batch sizes) is the same interval over
the per-seed differences (paired: the same seed gives both the same data subset and order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Interval", "interval", "paired_interval", "t_quantile"]

# t(0.975, df) for df = 1..30; beyond 30 the normal quantile is within 2%.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df >= 1`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its 95% interval ``[low, high]`` (equal to the mean for n = 1)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        """The interval resolves a nonzero value (needs at least two values)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def scaled(self, factor: float) -> "Interval":
        low, high = sorted((self.low * factor, self.high * factor))
        return Interval(self.mean * factor, low, high, self.n)

    def text(self, digits: int = 2, signed: bool = False) -> str:
        """``'81.23 [80.10, 82.36]'``, or ``'81.23 (n=1)'`` without an interval."""
        form = f"{{:{'+' if signed else ''}.{digits}f}}"
        if self.n < 2:
            return form.format(self.mean) + " (n=1)"
        return f"{form.format(self.mean)} [{form.format(self.low)}, {form.format(self.high)}]"


def interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t interval of ``values`` (at least one)."""
    n = len(values)
    if n == 0:
        raise ValueError("interval of no values: need at least one")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_interval(a: dict[int, float], b: dict[int, float]) -> Interval:
    """Interval of ``a - b`` over the seeds both have (keys are seeds)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no common seeds to pair: {sorted(a)} vs {sorted(b)}")
    return interval([a[s] - b[s] for s in seeds])
