"""The batch-size grid of the SN paper (Luo et al., ICLR 2019, Table 2 and Fig. 1) in
small: every normalizer at every per-process batch size, on the same training samples, with
the learning rate scaled linearly with the batch (``python -m experiments.batch_size sweep``).

Each run writes ``OUT/runs/<norm>-b<batch>/result.json``; a rerun of the same command skips
every run whose result exists with the same settings, so an interrupted sweep resumes.
Then ``results.json``, ``results.md`` (the paper-style table with SN-BN and SN-GN rows),
``accuracy_vs_batch.png`` and ``importance_vs_batch.png`` are written to ``OUT``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

from .data import load_dataset
from .plots import mean_importance, plot_accuracy_vs_batch, plot_importance_vs_batch
from .train import TrainConfig, config_error, ConfigError, train

__all__ = ["run_dir", "sweep", "write_report", "results_markdown"]


def run_dir(out: str, norm: str, batch_size: int) -> str:
    return os.path.join(out, "runs", f"{norm}-b{batch_size}")


def _finished(path: str, cfg: TrainConfig) -> Optional[dict[str, Any]]:
    """The stored result of this exact config, or None."""
    try:
        with open(os.path.join(path, "result.json")) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if result.get("config") == cfg.to_dict() else None


def sweep(
    base: TrainConfig,
    norms: Sequence[str],
    batch_sizes: Sequence[int],
    out: str,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str = "",
) -> list[dict[str, Any]]:
    """Run (or resume) every ``norm x batch size`` with the other settings of ``base``, then
    write the report. Returns the list of run results in grid order."""
    from tqdm.auto import tqdm

    grid = [dataclasses.replace(base, norm=n, batch_size=b) for n in norms for b in batch_sizes]
    for cfg in grid:
        message = config_error(cfg)
        if message:
            raise ConfigError(message)
    start = time.perf_counter()
    data, notice = load_dataset(base.data_dir, base.dataset)
    if notice:
        log(notice)
    log(
        f"sweep: {len(norms)} norms x {len(batch_sizes)} batch sizes on {data.name}, "
        f"{base.limit_train or len(data.train_labels)} training samples x {base.epochs} epoch(s) per run; "
        f"lr = min({base.max_lr}, {base.base_lr} * batch / {base.ref_batch}), {base.warmup:.0%} warm-up, cosine decay"
    )
    results, reused = [], 0
    bar = tqdm(grid, desc="sweep", unit="run", disable=not progress)
    for cfg in bar:
        path = run_dir(out, cfg.norm, cfg.batch_size)
        result = _finished(path, cfg)
        if result is not None:
            reused += 1
            log(f"{cfg.norm:>3} batch {cfg.batch_size:>4}: done before, reusing {path}/result.json")
        else:
            result = train(cfg, path, progress=progress, log=bar.write if progress else log, data=data)
        results.append(result)
    elapsed = time.perf_counter() - start
    write_report(results, out, command=command, elapsed=elapsed, reused=reused)
    log(f"sweep: wrote {os.path.join(out, 'results.md')} and the plots in {elapsed:.0f} s ({reused} runs reused)")
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _table(runs: list[dict[str, Any]], key: str, norms: list[str], sizes: list[int]) -> list[str]:
    acc = {(r["config"]["norm"], r["config"]["batch_size"]): r[key] for r in runs}
    lines = ["| norm | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for n in norms:
        lines.append(f"| {n.upper()} | " + " | ".join(_pct(acc[n, b]) if (n, b) in acc else "-" for b in sizes) + " |")
    if "sn" in norms:
        for other in ("bn", "gn"):
            if other in norms:
                cells = [
                    f"{100 * (acc['sn', b] - acc[other, b]):+.2f}" if ("sn", b) in acc and (other, b) in acc else "-"
                    for b in sizes
                ]
                lines.append(f"| SN-{other.upper()} | " + " | ".join(cells) + " |")
    return lines


def results_markdown(runs: list[dict[str, Any]], command: str = "", elapsed: Optional[float] = None) -> str:
    """The paper-style tables (accuracy with batch-average and moving-average statistics,
    SN-BN and SN-GN differences) and the SN importance weights per batch size."""
    norms = list(dict.fromkeys(r["config"]["norm"] for r in runs))
    sizes = sorted({r["config"]["batch_size"] for r in runs})
    first = runs[0]
    cfg = first["config"]
    lines = [
        f"# Normalizers vs batch size on {first['dataset']}",
        "",
        f"Small residual CNN (`ResNetSmall`, width {cfg['width']}, 10 norm layers), {first['train_samples']} training samples x "
        f"{cfg['epochs']} epoch(s) per run (the same samples for every run), "
        f"{first['test_samples']} test samples, seed {cfg['seed']}, {first['world_size']} process(es).",
        f"Learning rate: {first['lr_rule']}. SGD, Nesterov momentum {cfg['momentum']}, weight decay "
        f"{cfg['weight_decay']} on conv/linear weights. GN: {cfg['gn_groups']} groups.",
        f"Machine: {first['machine']}.",
    ]
    if command:
        lines.append(f"Command: `{command}`.")
    if elapsed is not None:
        total = sum(r["wall_seconds"] for r in runs)
        lines.append(f"Sweep wall time: {elapsed:.0f} s (sum of the runs' own times: {total:.0f} s).")
    lines += [
        "",
        "## Test accuracy (%), batch-average statistics (`recompute_stats` after training)",
        "",
        *_table(runs, "test_accuracy_recomputed", norms, sizes),
        "",
        "## Test accuracy (%), moving averages kept during training (momentum 0.1)",
        "",
        *_table(runs, "test_accuracy", norms, sizes),
    ]
    sn_runs = sorted((r for r in runs if r.get("importance")), key=lambda r: r["config"]["batch_size"])
    if sn_runs:
        averaged = [(r["config"]["batch_size"], mean_importance(r)) for r in sn_runs]
        keys = list(averaged[0][1])
        lines += [
            "",
            "## SN importance weights, averaged over the layers",
            "",
            "| batch | " + " | ".join(k.replace("_", " ").replace(" in", " IN").replace(" ln", " LN").replace(" bn", " BN") for k in keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        lines += [f"| {b} | " + " | ".join(f"{w[k]:.3f}" for k in keys) + " |" for b, w in averaged]
    return "\n".join(lines) + "\n"


def write_report(runs: list[dict[str, Any]], out: str, *, command: str = "", elapsed: Optional[float] = None, reused: int = 0) -> None:
    """Write ``results.json``, ``results.md`` and the two figures to ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"command": command, "elapsed_seconds": elapsed, "reused_runs": reused, "runs": runs}, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(results_markdown(runs, command, elapsed))
    plot_accuracy_vs_batch(runs, os.path.join(out, "accuracy_vs_batch.png"))
    if any(r.get("importance") for r in runs):
        plot_importance_vs_batch(runs, os.path.join(out, "importance_vs_batch.png"))
