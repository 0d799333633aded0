"""The study's figures, after the SN paper (Luo et al., ICLR 2019): test accuracy against
per-process batch size with 95% intervals over seeds (its Fig. 1 / Table 2), and the
importance weights of switchable layers against batch size (its Fig. 1 right), with their
spread over the layers. Legends sit outside the axes, so they hide no data.

Drawn on matplotlib's Agg canvas without pyplot, so no global backend changes.
"""

from __future__ import annotations

from typing import Any, Sequence

from .report import BATCH_AVG, MOVING_AVG, Cells, weight_spread, weight_values
from .stats import interval

__all__ = ["NORM_STYLE", "plot_accuracy_vs_batch", "plot_importance_vs_batch", "plot_run_importance"]

#: Colour and marker per normalizer, shared by the figures (others get grey crosses).
NORM_STYLE = {
    "bn": ("#55A868", "o"),
    "gn": ("#8172B3", "s"),
    "sn": ("#C44E52", "D"),
    "brn": ("#937860", "P"),
    "ssn": ("#DA8BC3", "X"),
    "ln": ("#DD8452", "^"),
    "in": ("#4C72B0", "v"),
}
_SOURCE_COLOUR = {"in": "#4C72B0", "ln": "#DD8452", "bn": "#55A868"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _log2_axis(ax: Any, batch_sizes: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batch_sizes))
    ax.set_xticklabels([str(b) for b in batch_sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size per process")
    ax.grid(True, alpha=0.3)


def _errorbar(ax: Any, xs: list[float], values: list[dict[int, float]], **style: Any) -> None:
    intervals = [interval(list(v.values())) for v in values]
    means = [iv.mean for iv in intervals]
    ax.errorbar(
        xs, means, yerr=[[m - iv.low for m, iv in zip(means, intervals)], [iv.high - m for m, iv in zip(means, intervals)]],
        capsize=3, linewidth=1.5, markersize=5, **style,
    )


def plot_accuracy_vs_batch(runs: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Test accuracy (%) against batch size, mean and 95% interval over seeds per normalizer;
    left panel with batch-average statistics, right panel with the moving averages."""
    cells = Cells(runs)
    fig = _figure(10.0, 4.4)
    n = len(cells.norms)
    for panel, (key, name) in enumerate(((BATCH_AVG, "batch-average statistics"), (MOVING_AVG, "moving averages"))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for i, norm in enumerate(cells.norms):
            sizes = [b for b in cells.sizes if cells.values(norm, b, key)]
            colour, marker = NORM_STYLE.get(norm, ("#666666", "x"))
            shift = 2 ** (0.06 * (i - (n - 1) / 2))  # side by side, so the bars do not overlap
            _errorbar(ax, [b * shift for b in sizes], [cells.values(norm, b, key) for b in sizes],
                      color=colour, marker=marker, label=norm.upper())
        _log2_axis(ax, cells.sizes)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"evaluated with {name}", fontsize=10)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(title or f"Test accuracy vs batch size (mean and 95% interval over {len(cells.seeds)} seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path)
    return path


def plot_importance_vs_batch(runs: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Importance weights of each switchable normalizer against batch size: per source the
    layer average (mean and 95% interval over seeds) and the band from the smallest to the
    largest layer; left the means' weights, right the variances'."""
    cells = Cells(runs)
    norms = cells.switchable()
    if not norms:
        raise ValueError("plot_importance_vs_batch: no run has importance weights; include a switchable norm such as 'sn'")
    fig = _figure(10.0, 3.9 * len(norms) + 0.5)
    for row, norm in enumerate(norms):
        for col, kind in enumerate(("mean", "var")):
            ax = fig.add_subplot(len(norms), 2, 2 * row + col + 1)
            for source in ("in", "ln", "bn"):
                key = f"{kind}_{source}"
                sizes = [b for b in cells.sizes if weight_values(cells, norm, b, key)]
                if not sizes:
                    continue
                colour = _SOURCE_COLOUR[source]
                spreads = [weight_spread(cells, norm, b, key) for b in sizes]
                ax.fill_between(sizes, [s[0] for s in spreads], [s[1] for s in spreads], color=colour, alpha=0.12, linewidth=0)
                _errorbar(ax, sizes, [weight_values(cells, norm, b, key) for b in sizes], color=colour, marker="o",
                          label=source.upper())
            ax.axhline(1 / 3, color="#999999", linestyle=":", linewidth=1, label="initial (1/3)")
            _log2_axis(ax, cells.sizes)
            ax.set_ylim(0.0, 1.0)
            ax.set_ylabel("importance weight")
            ax.set_title(f"{norm.upper()}: weights of the {'means' if kind == 'mean' else 'variances'}", fontsize=10)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(title or "Importance weights vs batch size: layer average (95% interval over seeds), band: smallest to largest layer",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path)
    return path


def plot_run_importance(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """One run's importance weights per layer: stacked bars of the sources, means and variances."""
    fig = _figure(10.0, 3.8)
    layers = [r["layer"] for r in rows]
    for col, kind in enumerate(("mean", "var")):
        ax = fig.add_subplot(1, 2, col + 1)
        bottom = [0.0] * len(rows)
        for source in ("in", "ln", "bn"):
            key = f"{kind}_{source}"
            if key not in rows[0]:
                continue
            heights = [r[key] for r in rows]
            ax.bar(range(len(rows)), heights, bottom=bottom, color=_SOURCE_COLOUR[source], label=source.upper())
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"weights of the {'means' if kind == 'mean' else 'variances'}", fontsize=10)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.94))
    fig.savefig(path)
    return path
