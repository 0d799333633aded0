"""Importance weights of the Switchable Normalization layers of a model: table and figure.

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization", ICLR 2019
(Figures 1 and 6 show, per layer, the softmax weights of IN / LN / BN for means and
variances; the keras-switchnorm README shows the same figure). matplotlib is an optional
extra (``pip install normkit[plot]``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Union

from torch import nn

from normkit.nn.registry import kind_of

__all__ = ["ImportanceRow", "ImportanceReport", "importance_report", "plot_importance", "SOURCE_COLOURS"]

#: Fixed colour per source, so that figures of different models compare at a glance.
SOURCE_COLOURS = {"in": "#4C72B0", "ln": "#DD8452", "bn": "#55A868"}
_GN_COLOURS = ("#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")
_SOURCE_LABELS = {"in": "IN", "ln": "LN", "bn": "BN"}


def _source_order(source: str) -> tuple[int, int]:
    fixed = ("in", "ln", "bn")
    return (fixed.index(source), 0) if source in fixed else (len(fixed), int(re.sub(r"\D", "", source) or 0))


def source_colour(source: str) -> str:
    """The colour of a source in :func:`plot_importance` (``'gnG'`` sources by their G)."""
    if source in SOURCE_COLOURS:
        return SOURCE_COLOURS[source]
    return _GN_COLOURS[int(re.sub(r"\D", "", source) or 0) % len(_GN_COLOURS)]


def _label(source: str) -> str:
    return _SOURCE_LABELS.get(source, source.upper())


@dataclass(frozen=True)
class ImportanceRow:
    """Importance weights of one SN layer: ``mean[k]`` and ``var[k]`` for ``sources[k]``."""

    layer: str
    sources: tuple[str, ...]
    mean: tuple[float, ...]
    var: tuple[float, ...]


@dataclass(frozen=True)
class ImportanceReport:
    """One :class:`ImportanceRow` per SN layer, in module order.

    ``str(report)`` is an aligned table (a ``-`` where a layer lacks a source);
    :meth:`to_dicts` gives flat rows for CSV / JSON.
    """

    rows: tuple[ImportanceRow, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source used by some layer, in the order in, ln, bn, gnG (G ascending)."""
        return tuple(sorted({s for row in self.rows for s in row.sources}, key=_source_order))

    def to_dicts(self) -> list[dict[str, Any]]:
        """``[{"layer": path, "mean_in": w, ..., "var_bn": w}, ...]``, keys for the layer's sources."""
        out = []
        for row in self.rows:
            item: dict[str, Any] = {"layer": row.layer}
            item.update({f"mean_{s}": w for s, w in zip(row.sources, row.mean)})
            item.update({f"var_{s}": w for s, w in zip(row.sources, row.var)})
            out.append(item)
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        if not self.rows:
            return "importance_report: no SwitchNorm layers"
        sources = self.sources
        header = ["layer"] + [f"mean {_label(s)}" for s in sources] + [f"var {_label(s)}" for s in sources]
        table = [header]
        for row in self.rows:
            weights = dict(zip(row.sources, row.mean)), dict(zip(row.sources, row.var))
            table.append(
                [row.layer] + [f"{w[s]:.3f}" if s in w else "-" for w in weights for s in sources]
            )
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line))
            for line in table
        ]
        return "\n".join(lines)


def importance_report(model: nn.Module) -> ImportanceReport:
    """The importance weights (softmax of the logits) of every SwitchNorm layer of ``model``.

    Args:
        model: any ``nn.Module``; a SwitchNorm layer itself is fine.

    Returns:
        :class:`ImportanceReport`, one row per SN layer (empty if there is none).

    Examples::

        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normkit.SwitchNorm2d(8))
        >>> print(normkit.importance_report(net))
        layer  mean IN  mean LN  mean BN  var IN  var LN  var BN
        1        0.333    0.333    0.333   0.333   0.333   0.333
    """
    rows = []
    for name, module in model.named_modules():
        kind = kind_of(module)
        if kind is not None and kind.switchable:
            rows.append(
                ImportanceRow(
                    name or type(module).__name__,
                    tuple(module.sources),
                    tuple(float(w) for w in module.mean_weights.detach().cpu()),
                    tuple(float(w) for w in module.var_weights.detach().cpu()),
                )
            )
    return ImportanceReport(tuple(rows))


def plot_importance(
    model_or_report: Union[nn.Module, ImportanceReport],
    path: Union[str, os.PathLike],
    *,
    title: str = "Switchable Normalization importance weights",
    dpi: int = 120,
) -> str:
    """Save a stacked-bar figure of the importance weights (as in the SN paper's Figure 1).

    One pair of bars per SN layer (module order, left to right): the left bar stacks the
    mean weights, the right (hatched) bar the variance weights; each source has a fixed
    colour (:data:`SOURCE_COLOURS`). Drawn with matplotlib's Agg canvas, without pyplot, so
    it changes no global backend and opens no window.

    Args:
        model_or_report: a model (its :func:`importance_report` is taken) or a report.
        path: the image file to write (``.png``; any format matplotlib knows by extension).
        title: figure title. Default: "Switchable Normalization importance weights".
        dpi: resolution. Default: 120.

    Returns:
        ``str(path)``.

    Raises:
        ImportError: matplotlib is not installed (``pip install normkit[plot]``).
        ValueError: no SwitchNorm layer to plot.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError(
            "plot_importance needs matplotlib, which is not installed; install it with "
            "`pip install normkit[plot]` (or `pip install matplotlib`)"
        ) from err
    if isinstance(model_or_report, nn.Module):
        report = importance_report(model_or_report)
    elif isinstance(model_or_report, ImportanceReport):
        report = model_or_report
    else:
        raise TypeError(
            f"plot_importance expects an nn.Module or an ImportanceReport, got {type(model_or_report).__name__}"
        )
    if not report.rows:
        raise ValueError("plot_importance: the model has no SwitchNorm layer, so there are no weights to plot")

    n = len(report.rows)
    fig = Figure(figsize=(min(max(6.0, 0.45 * n + 2.5), 30.0), 4.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38
    for i, row in enumerate(report.rows):
        for offset, weights, hatch in ((-width / 2, row.mean, None), (width / 2, row.var, "///")):
            bottom = 0.0
            for source in sorted(row.sources, key=_source_order):
                w = weights[row.sources.index(source)]
                ax.bar(
                    i + offset, w, width, bottom=bottom, color=source_colour(source),
                    hatch=hatch, edgecolor="white", linewidth=0.6,
                )
                bottom += w
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("importance weight")
    ax.set_xticks(range(n))
    labels = [row.layer for row in report.rows]
    rotate = n > 6 or max(len(s) for s in labels) > 10
    ax.set_xticklabels(labels, rotation=60 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_title(title)
    handles = [Patch(facecolor=source_colour(s), label=_label(s)) for s in report.sources]
    handles += [
        Patch(facecolor="#BBBBBB", edgecolor="white", label="mean (left)"),
        Patch(facecolor="#BBBBBB", edgecolor="white", hatch="///", label="variance (right)"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return str(path)
