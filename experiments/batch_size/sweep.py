"""The study's grid (``python -m experiments.batch_size sweep``): every normalizer at every
per-process batch size and seed, plus a sweep of the running-average momentum, on the
same training samples per seed, with the learning rate scaled linearly with the batch.

Each run writes ``OUT/runs/<norm>-b<batch>-s<seed>[-m<momentum>]/result.json``; a rerun of
the same command reuses every run whose result exists with the same settings, so an
interrupted sweep continues with the runs it had not finished. Runs are independent and
single-threaded, so ``jobs`` processes in parallel give the same numbers as one. Then
``results.json``, ``results.md`` (summary of claims, tables) and, with matplotlib,
``accuracy_vs_batch.png`` and ``importance_vs_batch.png`` are written to ``OUT``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from .data import Dataset, load_dataset
from .deps import has_module
from .norms import layer_options, options_record
from .report import results_markdown, summary_text
from .train import ConfigError, TrainConfig, config_error, summary_line, train

__all__ = ["Grid", "grid_configs", "run_dir", "sweep", "write_report"]


@dataclass
class Grid:
    """What a sweep runs: ``norms x batch_sizes x seeds`` with the layers' default momentum,
    and ``momentum_norms`` at ``momentum_batch`` with each of ``momenta`` for the same seeds."""

    norms: Sequence[str]
    batch_sizes: Sequence[int]
    seeds: Sequence[int] = (0,)
    momenta: Sequence[float] = ()
    momentum_norms: Sequence[str] = ()
    momentum_batch: int = 2


def grid_configs(base: TrainConfig, grid: Grid) -> list[TrainConfig]:
    """Every run of ``grid`` with the other settings of ``base``, in table order."""
    configs = [
        dataclasses.replace(base, norm=n, batch_size=b, seed=s, norm_momentum=None)
        for n in grid.norms for b in grid.batch_sizes for s in grid.seeds
    ]
    configs += [
        dataclasses.replace(base, norm=n, batch_size=grid.momentum_batch, seed=s, norm_momentum=m)
        for n in grid.momentum_norms for m in grid.momenta for s in grid.seeds
    ]
    return configs


def run_dir(out: str, cfg: TrainConfig) -> str:
    momentum = "" if cfg.norm_momentum is None else f"-m{cfg.norm_momentum:g}"
    return os.path.join(out, "runs", f"{cfg.norm}-b{cfg.batch_size}-s{cfg.seed}{momentum}")


def _finished(path: str, cfg: TrainConfig) -> Optional[dict[str, Any]]:
    """The stored result of this exact config, or None; also None when the layers this code
    builds for it take other options (a run from before a change of the study's layers)."""
    try:
        with open(os.path.join(path, "result.json")) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    if result.get("config") != cfg.to_dict():
        return None
    steps = result.get("steps")
    expected = layer_options(cfg.norm, cfg.batch_size, cfg.norm_momentum, steps if isinstance(steps, int) else None)
    return result if result.get("layer_options") == options_record(expected) else None


_worker_data: Optional[Dataset] = None


def _start_worker(data_dir: Optional[str], dataset: str) -> None:
    global _worker_data
    _worker_data = load_dataset(data_dir, dataset)[0]


def _train_in_worker(cfg: TrainConfig, path: str, plots: bool) -> dict[str, Any]:
    return train(cfg, path, progress=False, log=lambda _line: None, data=_worker_data, plots=plots)


def sweep(
    base: TrainConfig,
    grid: Grid,
    out: str,
    *,
    jobs: int = 1,
    progress: bool = True,
    plots: bool = True,
    log: Callable[[str], None] = print,
    command: str = "",
) -> list[dict[str, Any]]:
    """Run (or resume) every run of ``grid``, ``jobs`` at a time in separate processes, then
    write the report and print its summary. Returns the run results in grid order."""
    configs = grid_configs(base, grid)
    for cfg in configs:
        message = config_error(cfg)
        if message:
            raise ConfigError(message)
    start = time.perf_counter()
    data, notice = load_dataset(base.data_dir, base.dataset)
    if notice:
        log(notice)
    log(
        f"sweep: {len(configs)} runs ({', '.join(n.upper() for n in grid.norms)} x batch {','.join(map(str, grid.batch_sizes))} "
        f"x {len(grid.seeds)} seed(s){f', + momentum sweep' if grid.momenta else ''}) on {data.name}"
        f"{f' average-pooled {base.pool}x' if base.pool > 1 else ''}, "
        f"{base.limit_train or len(data.train_labels)} training samples x {base.epochs} epoch(s), {jobs} process(es)"
    )
    results: dict[int, dict[str, Any]] = {}
    pending = []
    for i, cfg in enumerate(configs):
        stored = _finished(run_dir(out, cfg), cfg)
        if stored is None:
            pending.append(i)
        else:
            results[i] = stored
    if results:
        log(f"sweep: reusing {len(results)} finished runs from {os.path.join(out, 'runs')}")
    # Smallest batches first: they take longest, so the processes finish together.
    pending.sort(key=lambda i: configs[i].batch_size)

    def report(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        if progress:
            log(f"[{len(results)}/{len(configs)}] {summary_line(result)}")

    if jobs <= 1 or len(pending) <= 1:
        for i in pending:
            report(i, train(configs[i], run_dir(out, configs[i]), progress=False, log=log, data=data, plots=plots))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(base.data_dir, base.dataset)) as pool:
            futures = {i: pool.submit(_train_in_worker, configs[i], run_dir(out, configs[i]), plots) for i in pending}
            try:
                for i in pending:
                    report(i, futures[i].result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    runs = [results[i] for i in range(len(configs))]
    elapsed = time.perf_counter() - start
    write_report(runs, out, command=command, elapsed=elapsed, reused=len(configs) - len(pending), plots=plots)
    log(summary_text(runs))
    log(f"sweep: wrote {os.path.join(out, 'results.md')} in {elapsed:.0f} s ({len(configs) - len(pending)} runs reused)")
    return runs


def write_report(
    runs: list[dict[str, Any]], out: str, *, command: str = "", elapsed: Optional[float] = None, reused: int = 0, plots: bool = True
) -> list[str]:
    """Write ``results.json``, ``results.md`` and (with ``plots`` and matplotlib) the two
    figures to ``out``; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "results.json"), os.path.join(out, "results.md")]
    with open(paths[0], "w") as f:
        json.dump({"command": command, "elapsed_seconds": elapsed, "reused_runs": reused, "runs": runs}, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(results_markdown(runs, command, elapsed))
    if plots and has_module("matplotlib"):
        from .plots import plot_accuracy_vs_batch, plot_importance_vs_batch

        paths.append(plot_accuracy_vs_batch(runs, os.path.join(out, "accuracy_vs_batch.png")))
        if any(r.get("importance") for r in runs):
            paths.append(plot_importance_vs_batch(runs, os.path.join(out, "importance_vs_batch.png")))
    return paths
