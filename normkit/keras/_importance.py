"""Importance weights of the SwitchNormalization layers of a Keras model: table and figure.

The same :class:`normkit.ImportanceReport` (table, ``to_dicts``) and the same figure as the
torch tools (:func:`normkit.plot_importance` draws from a report, not from modules).
"""

from __future__ import annotations

import numpy as np
from keras import ops

from normkit.keras._switchnorm import SwitchNormalization
from normkit.tools.importance import ImportanceReport, ImportanceRow
from normkit.tools.importance import plot_importance as _plot_report

__all__ = ["importance_report", "plot_importance"]


def importance_report(model):
    """The importance weights (softmax of the logits) of every SwitchNormalization layer of ``model``.

    Args:
        model: a built Keras model or layer (nested models and layers are searched).

    Returns:
        ``normkit.ImportanceReport``, one row per SN layer (by layer name, in layer order).
    """
    rows = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, SwitchNormalization) and layer.built:
            rows.append(
                ImportanceRow(
                    layer.name,
                    tuple(layer.sources),
                    tuple(float(w) for w in np.asarray(ops.convert_to_numpy(layer.mean_weights))),
                    tuple(float(w) for w in np.asarray(ops.convert_to_numpy(layer.var_weights))),
                )
            )
    return ImportanceReport(tuple(rows))


def plot_importance(model_or_report, path, **kwargs):
    """Save the stacked-bar importance figure of a Keras model (or of a report) to ``path``.

    Keyword arguments (``title``, ``dpi``) and errors are those of :func:`normkit.plot_importance`.
    """
    report = model_or_report if isinstance(model_or_report, ImportanceReport) else importance_report(model_or_report)
    return _plot_report(report, path, **kwargs)
