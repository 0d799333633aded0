"""The normalizers the study runs, found through normkit's public API at run time.

normkit's own registry decides which names exist: a name is runnable when
:func:`normkit.create_norm` builds a layer from it. The study keeps no copy of the valid
names; an unknown name gets create_norm's message, which lists them. Normalizers added to
normkit later (Batch Renormalization ``'brn'``, Sparse SN ``'ssn'``) join the study's grid
as soon as create_norm accepts their names.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

__all__ = ["STUDY_NORMS", "available_norms", "check_norm", "layer_options", "options_record", "probe",
           "tracks_running_stats"]

#: The grid of the study, in table order: the paper's BN, GN, SN, then Batch Renormalization
#: and Sparse SN (Luo et al., ICML 2019); only the names normkit has at run time are used.
STUDY_NORMS = ("bn", "gn", "sn", "brn", "ssn")


def probe(name: str, **options: Any) -> nn.Module:
    """A small layer of normalizer ``name`` (raises create_norm's ValueError for an unknown name)."""
    from normkit import create_norm

    return create_norm(name, 8, **options)


def check_norm(name: str) -> str:
    """``name`` in lower case if normkit builds it; else ValueError with create_norm's message."""
    probe(name)
    return name.lower()


def available_norms(names: tuple[str, ...] = STUDY_NORMS) -> list[str]:
    """The names among ``names`` that this normkit builds, in the same order."""
    found = []
    for name in names:
        try:
            probe(name)
        except ValueError:
            continue
        found.append(name)
    return found


def _batch_sources(layer: nn.Module) -> Optional[tuple[str, ...]]:
    sources = getattr(layer, "sources", None)
    return tuple(sources) if sources is not None and "bn" in sources else None


def layer_options(name: str, batch_size: int, momentum: Optional[float] = None,
                  total_steps: Optional[int] = None) -> dict[str, Any]:
    """Constructor options for the study's layers of ``name`` at per-process ``batch_size``.

    A switchable layer (one with ``sources``) drops its BN source at batch 1, where the batch
    statistic of a channel is its instance statistic (the SN paper's setting for batch 1);
    ``momentum`` (the weight of the new batch in the running averages) is set only when given.
    A layer with a radius schedule (``radius_steps``: Sparse SN) gets the run's
    ``total_steps`` as its length, the SSN paper's ``r = t / T`` with ``T`` the number of
    training steps, so that every run ends one-hot whatever its batch size.
    """
    options: dict[str, Any] = {}
    layer = probe(name)
    sources = _batch_sources(layer)
    if batch_size == 1 and sources is not None:
        options["sources"] = tuple(s for s in sources if s != "bn")
    if momentum is not None:
        options["momentum"] = momentum
    if total_steps is not None and getattr(layer, "radius_steps", None) is not None:
        options["radius_steps"] = total_steps
    return options


def options_record(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as a run's ``result.json`` stores them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def tracks_running_stats(name: str) -> bool:
    """Whether layers of ``name`` keep running averages (the moving-average evaluation differs
    from the batch-average one only for them)."""
    return getattr(probe(name), "running_mean", None) is not None
