"""The sweep's two figures, after the SN paper (Luo et al., ICLR 2019): test accuracy
against per-device batch size (its Fig. 1 / Table 2) and SN importance weights against
batch size (its Fig. 1 right: weights move from BN toward IN / LN as the batch shrinks).

Drawn on matplotlib's Agg canvas without pyplot, so no global backend changes.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["NORM_STYLE", "plot_accuracy_vs_batch", "plot_importance_vs_batch", "mean_importance"]

#: Colour and marker per normalizer, shared by the figures.
NORM_STYLE = {
    "bn": ("#55A868", "o"),
    "gn": ("#8172B3", "s"),
    "sn": ("#C44E52", "D"),
    "ln": ("#DD8452", "^"),
    "in": ("#4C72B0", "v"),
}


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


def plot_accuracy_vs_batch(runs: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Test accuracy (%) against batch size, one line per normalizer: solid with the
    batch-average statistics, dashed with the moving averages."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    norms = list(dict.fromkeys(r["config"]["norm"] for r in runs))
    sizes = sorted({r["config"]["batch_size"] for r in runs})
    for norm in norms:
        mine = sorted((r for r in runs if r["config"]["norm"] == norm), key=lambda r: r["config"]["batch_size"])
        colour, marker = NORM_STYLE.get(norm.lower(), ("#333333", "x"))
        xs = [r["config"]["batch_size"] for r in mine]
        ax.plot(xs, [100 * r["test_accuracy_recomputed"] for r in mine], color=colour, marker=marker, label=f"{norm.upper()}")
        if any(r["test_accuracy"] != r["test_accuracy_recomputed"] for r in mine):
            ax.plot(
                xs, [100 * r["test_accuracy"] for r in mine], color=colour, marker=marker, linestyle="--",
                alpha=0.6, markerfacecolor="none", label=f"{norm.upper()} (moving avg)",
            )
    _log2_axis(ax, sizes)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Test accuracy vs batch size (solid: batch-average statistics)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


def mean_importance(run: dict[str, Any]) -> dict[str, float]:
    """Importance weights of one SN run averaged over its layers: ``{"mean_in": w, ...}``."""
    rows = run.get("importance") or []
    keys = [k for k in rows[0] if k != "layer"] if rows else []
    return {k: sum(row[k] for row in rows) / len(rows) for k in keys}


def plot_importance_vs_batch(runs: list[dict[str, Any]], path: str, title: str = "") -> str:
    """SN importance weights (averaged over layers) against batch size; left panel the
    means' weights, right panel the variances'."""
    from normkit import source_colour

    sn_runs = sorted((r for r in runs if r.get("importance")), key=lambda r: r["config"]["batch_size"])
    if not sn_runs:
        raise ValueError("plot_importance_vs_batch: no run has SN importance weights; include 'sn' in --norms")
    sizes = [r["config"]["batch_size"] for r in sn_runs]
    averaged = [mean_importance(r) for r in sn_runs]
    sources = [k[5:] for k in averaged[0] if k.startswith("mean_")]
    top = max(v for a in averaged for v in a.values())
    fig = _figure(9.0, 3.8)
    for i, kind in enumerate(("mean", "var")):
        ax = fig.add_subplot(1, 2, i + 1)
        for source in sources:
            ax.plot(sizes, [a[f"{kind}_{source}"] for a in averaged], marker="o", color=source_colour(source), label=source.upper())
        # The weights start equal (softmax of zero logits): show that level for reference.
        ax.axhline(1.0 / len(sources), color="#999999", linestyle=":", linewidth=1, label="initial")
        _log2_axis(ax, sizes)
        ax.set_ylim(0.0, min(1.0, max(0.6, top + 0.1)))
        ax.set_ylabel("importance weight (mean over layers)")
        ax.set_title(f"weights of the {'means' if kind == 'mean' else 'variances'}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title or "SN importance weights vs batch size", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path
