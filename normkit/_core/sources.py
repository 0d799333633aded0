"""The statistic sources of Switchable Normalization and their one parser.

``'in'`` per (sample, channel), ``'ln'`` per sample, ``'bn'`` per channel over the batch,
``'gnG'`` per (sample, group of C/G channels). Every source is an exact merge of the
per-(sample, channel) moments, so no source reads ``x`` again.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from normkit._core.moments import Moments, merge_moments

__all__ = ["VALID_SOURCES_TEXT", "parse_sources", "source_code", "source_moments"]

_GN_PATTERN = re.compile(r"^gn([1-9]\d*)$")
VALID_SOURCES_TEXT = "'in', 'ln', 'bn' or 'gnG' (group norm with G groups, e.g. 'gn8')"
#: The integer codes the compiled mixer knows: in, ln, bn, gn.
_CODES = {"in": 0, "ln": 1, "bn": 2}
GN_CODE = 3


def parse_sources(sources: Sequence[str] | str, num_features: Optional[int] = None) -> tuple[str, ...]:
    """Validate a sequence of source names; lower-cased tuple, in the given order."""
    if isinstance(sources, str):
        sources = (sources,)
    if not all(isinstance(s, str) for s in sources):
        raise TypeError(f"sources must be strings from {VALID_SOURCES_TEXT}, got {tuple(sources)!r}")
    sources = tuple(s.lower() for s in sources)
    if not sources:
        raise ValueError(f"sources must name at least one of {VALID_SOURCES_TEXT}, got an empty sequence")
    if len(set(sources)) != len(sources):
        raise ValueError(f"sources must not repeat a name, got {sources}")
    for s in sources:
        if s in _CODES:
            continue
        gn = _GN_PATTERN.match(s)
        if gn is None:
            raise ValueError(f"unknown normalizer source {s!r}; valid sources are {VALID_SOURCES_TEXT}")
        groups = int(gn.group(1))
        if num_features is not None and num_features % groups:
            raise ValueError(
                f"source {s!r} needs a group count that divides num_features={num_features}, got {groups}"
            )
    return sources


def source_code(source: str) -> tuple[int, int]:
    """``(kind, groups)`` of a parsed source for the compiled mixer (groups is 1 but for GN)."""
    if source in _CODES:
        return _CODES[source], 1
    return GN_CODE, int(source[2:])


def source_moments(source: str, m_in: Moments, batch: Optional[Moments]) -> Moments:
    """The statistics of one source, from the IN moments (and the BN ones for ``'bn'``)."""
    if source == "in":
        return m_in
    if source == "ln":
        return merge_moments(m_in, 1)
    if source == "bn":
        assert batch is not None
        return batch
    groups = int(source[2:])
    n, c = m_in.mean.shape
    grouped = Moments(
        m_in.count.reshape(n, 1, 1),
        m_in.mean.reshape(n, groups, c // groups),
        m_in.var.reshape(n, groups, c // groups),
    )
    g = merge_moments(grouped, 2)
    return Moments(
        g.count.reshape(n, groups)[:, :1],
        g.mean.expand(n, groups, c // groups).reshape(n, c),
        g.var.expand(n, groups, c // groups).reshape(n, c),
    )
