"""Optional dependencies, checked before any training so that a missing one costs nothing.

matplotlib draws the figures (a run's results are written without it); scikit-learn is
needed only for the digits fallback when Fashion-MNIST is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Optional

__all__ = ["MissingDependency", "has_module", "require", "REQUIREMENTS"]

#: Where the study's dependencies are listed (the fix every message names).
REQUIREMENTS = "experiments/batch_size/requirements.txt"


class MissingDependency(RuntimeError):
    """An optional package a requested feature needs is not installed."""


def has_module(name: str) -> bool:
    """Whether ``import name`` can work (a ``None`` entry in ``sys.modules`` blocks an import)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, package: str, purpose: str, alternative: Optional[str] = None) -> None:
    """Raise :class:`MissingDependency` (one line, naming the package to install) when ``module``
    cannot be imported."""
    if has_module(module):
        return
    fix = f"pip install {package} (or pip install -r {REQUIREMENTS})"
    if alternative:
        fix += f", or {alternative}"
    raise MissingDependency(f"{purpose} needs {package}, which is not installed; {fix}")
