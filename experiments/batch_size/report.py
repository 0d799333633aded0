"""The study's tables and its summary of claims, from the runs' results.

Every number is a mean over seeds with a 95% t interval (:mod:`.stats`); a difference
(between batch sizes of one normalizer, or two normalizers at one batch size) is the
interval of the per-seed differences, paired by seed (a seed fixes the data subset and
order). A claim is stated as holding only where its interval excludes zero; where it does
not, the summary says the data cannot tell.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Optional

from .stats import Interval, interval, paired_interval

__all__ = ["Cells", "claims", "results_markdown", "summary_text"]

BATCH_AVG = "test_accuracy_recomputed"
MOVING_AVG = "test_accuracy"


def _label(norm: str) -> str:
    return norm.upper()


def _paired_or_none(a: dict[int, float], b: dict[int, float]) -> Optional[Interval]:
    return paired_interval(a, b) if set(a) & set(b) else None


class Cells:
    """The runs grouped by (norm, batch size, running-average momentum), each group by seed.
    ``momentum`` None is the layers' default (the main grid)."""

    def __init__(self, runs: Iterable[dict[str, Any]]) -> None:
        self.groups: dict[tuple[str, int, Optional[float]], dict[int, dict[str, Any]]] = defaultdict(dict)
        for run in runs:
            cfg = run["config"]
            self.groups[cfg["norm"], cfg["batch_size"], cfg.get("norm_momentum")][cfg["seed"]] = run
        main = [key for key in self.groups if key[2] is None]
        self.norms = list(dict.fromkeys(key[0] for key in main))
        self.sizes = sorted({key[1] for key in main})
        self.seeds = sorted({seed for group in self.groups.values() for seed in group})
        self.momenta = sorted({key for key in self.groups if key[2] is not None}, key=lambda k: (k[0], k[1], -k[2]))

    def values(self, norm: str, batch: int, key: str = BATCH_AVG, momentum: Optional[float] = None, scale: float = 100.0) -> dict[int, float]:
        return {seed: scale * run[key] for seed, run in self.groups.get((norm, batch, momentum), {}).items()}

    def cell(self, norm: str, batch: int, key: str = BATCH_AVG) -> Optional[Interval]:
        values = self.values(norm, batch, key)
        return interval(list(values.values())) if values else None

    def best_batch(self, norm: str, key: str = BATCH_AVG) -> int:
        """The batch size with the highest mean accuracy for ``norm``."""
        return max((b for b in self.sizes if self.values(norm, b, key)), key=lambda b: self.cell(norm, b, key).mean)

    def versus_best(self, norm: str, batch: int, key: str = BATCH_AVG) -> Optional[Interval]:
        """``norm`` at ``batch`` minus ``norm`` at its best batch size (None where a cell is missing)."""
        return _paired_or_none(self.values(norm, batch, key), self.values(norm, self.best_batch(norm, key), key))

    def versus(self, norm: str, other: str, batch: int, key: str = BATCH_AVG) -> Optional[Interval]:
        """``norm`` minus ``other`` at ``batch`` (None where a cell is missing)."""
        return _paired_or_none(self.values(norm, batch, key), self.values(other, batch, key))

    def switchable(self) -> list[str]:
        """Normalizers whose runs carry importance weights."""
        return [n for n in self.norms if any(r.get("importance") for (m, _b, _mo), g in self.groups.items() if m == n for r in g.values())]

    def comparisons(self) -> list[tuple[str, str]]:
        """``(norm, other)`` pairs the report compares: every switchable normalizer against
        each fixed one, and against the switchable ones listed before it (SSN - SN)."""
        switchable = self.switchable()
        fixed = [n for n in self.norms if n not in switchable]
        return [(norm, other) for i, norm in enumerate(switchable) for other in fixed + switchable[:i]]


def _weights(run: dict[str, Any]) -> dict[str, list[float]]:
    rows = run.get("importance") or []
    keys = [k for k in rows[0] if k != "layer"] if rows else []
    return {k: [row[k] for row in rows] for k in keys}


def _layer_mean(run: dict[str, Any], key: str) -> Optional[float]:
    per_layer = _weights(run).get(key)
    return sum(per_layer) / len(per_layer) if per_layer else None


def weight_values(cells: Cells, norm: str, batch: int, key: str) -> dict[int, float]:
    """Per seed: the importance weight ``key`` (``'mean_bn'``, ...) averaged over the layers."""
    out = {}
    for seed, run in cells.groups.get((norm, batch, None), {}).items():
        value = _layer_mean(run, key)
        if value is not None:
            out[seed] = value
    return out


def weight_spread(cells: Cells, norm: str, batch: int, key: str) -> Optional[tuple[float, float]]:
    """Smallest and largest per-layer weight ``key``, each averaged over the seeds."""
    runs = [r for r in cells.groups.get((norm, batch, None), {}).values() if key in _weights(r)]
    if not runs:
        return None
    layers = list(zip(*(_weights(r)[key] for r in runs)))
    per_layer = [sum(v) / len(v) for v in layers]
    return min(per_layer), max(per_layer)


# ------------------------------------------------------------------------------ tables


def _pm(iv: Optional[Interval], digits: int = 2, signed: bool = False) -> str:
    if iv is None:
        return "-"
    form = f"{{:{'+' if signed else ''}.{digits}f}}"
    return form.format(iv.mean) if iv.n < 2 else f"{form.format(iv.mean)} ± {iv.half_width:.{digits}f}"


def _header(first: str, sizes: list[int]) -> list[str]:
    return [f"| {first} | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---" + "|---:" * len(sizes) + "|"]


def accuracy_table(cells: Cells, key: str) -> list[str]:
    lines = _header("norm", cells.sizes)
    for norm in cells.norms:
        lines.append(f"| {_label(norm)} | " + " | ".join(_pm(cells.cell(norm, b, key)) for b in cells.sizes) + " |")
    return lines


def gap_table(cells: Cells, key: str = BATCH_AVG) -> list[str]:
    """Each normalizer against its own best batch size, then the pairs of :meth:`Cells.comparisons`."""
    lines = _header("difference (points)", cells.sizes)
    for norm in cells.norms:
        best = cells.best_batch(norm, key)
        row = [_pm(cells.versus_best(norm, b, key), signed=True) if b != best else "best" for b in cells.sizes]
        lines.append(f"| {_label(norm)} - {_label(norm)} at its best | " + " | ".join(row) + " |")
    for norm, other in cells.comparisons():
        row = [_pm(cells.versus(norm, other, b, key), signed=True) for b in cells.sizes]
        lines.append(f"| {_label(norm)} - {_label(other)} | " + " | ".join(row) + " |")
    return lines


def importance_table(cells: Cells, norm: str) -> list[str]:
    sizes = [b for b in cells.sizes if cells.groups.get((norm, b, None))]
    found = {k for b in sizes for r in cells.groups[norm, b, None].values() for k in _weights(r)}
    keys = [f"{kind}_{source}" for kind in ("mean", "var") for source in ("in", "ln", "bn") if f"{kind}_{source}" in found]
    keys += sorted(found - set(keys))  # other sources (e.g. gnG), after the paper's three
    lines = ["| batch | " + " | ".join(k.replace("_", " ").replace(" in", " IN").replace(" ln", " LN").replace(" bn", " BN") for k in keys) + " |",
             "|---" + "|---:" * len(keys) + "|"]
    for b in sizes:
        row = []
        for k in keys:
            values = weight_values(cells, norm, b, k)
            spread = weight_spread(cells, norm, b, k)
            row.append("-" if not values else f"{_pm(interval(list(values.values())), 3)} ({spread[0]:.2f}-{spread[1]:.2f})")
        lines.append(f"| {b} | " + " | ".join(row) + " |")
    return lines


def momentum_table(cells: Cells) -> list[str]:
    lines = ["| norm | batch | momentum | moving average | batch average | moving - batch average |", "|---|---:|---:|---:|---:|---:|"]
    for norm, batch, momentum in _momentum_settings(cells):
        moving = cells.values(norm, batch, MOVING_AVG, momentum)
        batch_avg = cells.values(norm, batch, BATCH_AVG, momentum)
        if not moving:
            continue
        shown = "0.1 (default)" if momentum is None else f"{momentum:g}"
        lines.append(
            f"| {_label(norm)} | {batch} | {shown} | {_pm(interval(list(moving.values())))} | "
            f"{_pm(interval(list(batch_avg.values())))} | {_pm(paired_interval(moving, batch_avg), signed=True)} |"
        )
    return lines


def _cpu_speed(run: dict[str, Any]) -> Optional[float]:
    cpu = run.get("train_cpu_seconds")
    return run["steps"] * run["config"]["batch_size"] / cpu if cpu else None


def speed_table(cells: Cells) -> list[str]:
    """Training samples per second of CPU time (what one idle core gives with one thread),
    with the wall-clock rate in parentheses (lower on a shared machine)."""
    lines = _header("samples/s, CPU (wall)", cells.sizes)
    for norm in cells.norms:
        row = []
        for b in cells.sizes:
            runs = list(cells.groups.get((norm, b, None), {}).values())
            cpu = [v for r in runs if (v := _cpu_speed(r)) is not None]
            wall = [r["samples_per_second"] for r in runs]
            row.append(f"{sum(cpu) / len(cpu):.0f} ({sum(wall) / len(wall):.0f})" if cpu else "-")
        lines.append(f"| {_label(norm)} | " + " | ".join(row) + " |")
    return lines


# ------------------------------------------------------------------------------ claims


def _where(gaps: dict[int, Interval]) -> tuple[list[int], list[int], list[int]]:
    below = [b for b, g in gaps.items() if g.excludes_zero() and g.high < 0]
    above = [b for b, g in gaps.items() if g.excludes_zero() and g.low > 0]
    within = [b for b in gaps if b not in below and b not in above]
    return below, within, above


def _list(sizes: list[int], gaps: dict[int, Interval]) -> str:
    return ", ".join(f"{b} ({gaps[b].text(1, signed=True)})" for b in sizes)


def _norm_claim(cells: Cells, norm: str) -> str:
    best = cells.best_batch(norm)
    gaps = {b: g for b in cells.sizes if b != best and (g := cells.versus_best(norm, b)) is not None}
    below, within, _above = _where(gaps)
    text = f"{_label(norm)}: best at batch {best} ({cells.cell(norm, best).text(1)}%)"
    if below:
        text += f"; lower beyond seed noise at batch {_list(below, gaps)}"
    if within:
        worst = min(within, key=lambda b: gaps[b].mean)
        text += f"; within noise of its best at batch {', '.join(map(str, within))} (largest gap {gaps[worst].text(1, signed=True)} at {worst})"
    if not below:
        text += " -> flat within noise"
    return text


def _pair_claim(cells: Cells, norm: str, other: str) -> Optional[str]:
    gaps = {b: g for b in cells.sizes if (g := cells.versus(norm, other, b)) is not None}
    if not gaps:
        return None
    below, within, above = _where(gaps)
    parts = []
    if above:
        parts.append(f"higher beyond noise at batch {_list(above, gaps)}")
    if below:
        parts.append(f"lower beyond noise at batch {_list(below, gaps)}")
    if within:
        parts.append(f"within noise at batch {', '.join(map(str, within))}")
    return f"{_label(norm)} - {_label(other)}: " + "; ".join(parts)


def _weight_claim(cells: Cells, norm: str) -> Optional[str]:
    with_bn = [b for b in cells.sizes if weight_values(cells, norm, b, "mean_bn")]
    if len(with_bn) < 2:
        return None
    small, large = with_bn[0], with_bn[-1]
    parts = []
    for source in ("bn", "ln", "in"):
        a, b = weight_values(cells, norm, small, f"mean_{source}"), weight_values(cells, norm, large, f"mean_{source}")
        if not a or not b:
            continue
        diff = paired_interval(a, b)
        mean_a, mean_b = sum(a.values()) / len(a), sum(b.values()) / len(b)
        verdict = "resolved" if diff.excludes_zero() else "within noise"
        parts.append(f"{source.upper()} {mean_b:.3f} -> {mean_a:.3f} ({diff.text(3, signed=True)}, {verdict})")
    return f"{_label(norm)} weights of the means, batch {large} -> {small} (layer average): " + "; ".join(parts)


def _momentum_settings(cells: Cells) -> list[tuple[str, int, Optional[float]]]:
    """(norm, batch, momentum) of the momentum sweep, the default momentum (None) first."""
    pairs = list(dict.fromkeys((n, b) for n, b, _m in cells.momenta))
    return [(n, b, m) for n, b in pairs for m in [None] + [k[2] for k in cells.momenta if k[:2] == (n, b)]]


def _momentum_claims(cells: Cells) -> list[str]:
    lines = []
    for norm, batch, momentum in _momentum_settings(cells):
        moving, batch_avg = cells.values(norm, batch, MOVING_AVG, momentum), cells.values(norm, batch, BATCH_AVG, momentum)
        if not moving:
            continue
        diff = paired_interval(moving, batch_avg)
        verdict = "no difference beyond noise"
        if diff.excludes_zero():
            verdict = "moving averages worse beyond noise" if diff.high < 0 else "moving averages better beyond noise"
        shown = "0.1" if momentum is None else f"{momentum:g}"
        lines.append(f"{_label(norm)} batch {batch}, momentum {shown}: moving - batch average {diff.text(1, signed=True)}, {verdict}")
    return lines


def claims(cells: Cells) -> list[str]:
    """The summary's lines: each normalizer against its best batch size, the pairs of
    :meth:`Cells.comparisons`, the switchable weights, and moving vs batch averages."""
    lines = [_norm_claim(cells, n) for n in cells.norms]
    pairs = cells.comparisons()
    for norm in cells.switchable():
        lines += [c for first, other in pairs if first == norm if (c := _pair_claim(cells, norm, other))]
        weight = _weight_claim(cells, norm)
        if weight:
            lines.append(weight)
    lines += _momentum_claims(cells)
    return lines


def summary_text(runs: list[dict[str, Any]]) -> str:
    """The short summary the sweep prints: the batch-average table and the claims."""
    cells = Cells(runs)
    n = len(cells.seeds)
    lines = [
        f"Test accuracy (%), batch-average statistics, mean ± 95% half-width over {n} seed(s):",
        *accuracy_table(cells, BATCH_AVG),
        "",
        f"Claims (differences in points, mean [95% interval], paired by seed; 'beyond noise' = interval excludes 0):",
        *(f"- {c}" for c in claims(cells)),
    ]
    return "\n".join(lines) + "\n"


def _images(run: dict[str, Any]) -> str:
    size, pool = run.get("image_size"), run["config"].get("pool", 1)
    if not size:
        return ""
    return f" on {size[0]}x{size[1]} images" + (f" ({pool}x{pool} average-pooled)" if pool > 1 else "")


def results_markdown(runs: list[dict[str, Any]], command: str = "", elapsed: Optional[float] = None) -> str:
    """``results.md``: settings, summary of claims, accuracy tables, differences, importance
    weights, moving vs batch averages, speed."""
    cells = Cells(runs)
    first = runs[0]
    cfg = first["config"]
    n = len(cells.seeds)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in runs)
    lines = [
        f"# Normalizers vs batch size on {first['dataset']}",
        "",
        f"Small residual CNN (`ResNetSmall`, width {cfg['width']}, 10 norm layers){_images(first)}; {first['train_samples']} training samples "
        f"x {cfg['epochs']} epoch(s) per run (a fixed random subset per seed), {first['test_samples']} test samples; "
        f"seeds {', '.join(map(str, cells.seeds))}; {first['world_size']} process(es) per run, {cfg['threads']} thread(s).",
        f"Learning rate: {first['lr_rule']}. SGD, Nesterov momentum {cfg['momentum']}, weight decay "
        f"{cfg['weight_decay']} on conv/linear weights. GN: {cfg['gn_groups']} groups. Switchable layers drop their BN "
        "source at batch 1.",
        f"Machine: {first['machine']}.",
    ]
    if command:
        lines.append(f"Command: `{command}`.")
    if elapsed is not None:
        lines.append(f"{len(runs)} runs; wall time of the last sweep command {elapsed:.0f} s; CPU time of the runs "
                     f"(training and evaluation) {cpu:.0f} s, that is about {cpu / 120:.0f} minutes on 2 idle cores.")
    lines += [
        "",
        "## Summary",
        "",
        f"Differences in points, mean [95% interval] over {n} seeds, paired by seed; a claim holds where its interval excludes 0.",
        "",
        *(f"- {c}" for c in claims(cells)),
        "",
        f"## Test accuracy (%), batch-average statistics (`recompute_stats` after training), mean ± 95% half-width",
        "",
        *accuracy_table(cells, BATCH_AVG),
        "",
        "## Test accuracy (%), moving averages kept during training (momentum 0.1)",
        "",
        *accuracy_table(cells, MOVING_AVG),
        "",
        "## Differences (points, batch average), paired by seed",
        "",
        *gap_table(cells),
    ]
    for norm in cells.switchable():
        lines += [
            "",
            f"## {_label(norm)} importance weights: mean over the layers ± 95% half-width over seeds (smallest-largest layer)",
            "",
            *importance_table(cells, norm),
        ]
    if cells.momenta:
        lines += ["", "## Moving vs batch averages across running-average momenta (the paper's Fig. 8)", "", *momentum_table(cells)]
    lines += ["", "## Training speed per process, 1 thread: samples per second of CPU time (of wall time), mean over seeds",
              "", *speed_table(cells)]
    return "\n".join(lines) + "\n"
