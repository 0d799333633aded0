"""Train and evaluate one configuration of the batch-size experiment
(``python -m experiments.batch_size train``).

Recipe (Luo et al., ICLR 2019, Sec. 4.1, scaled down): SGD with momentum 0.9 and weight
decay on conv / linear weights; learning rate scaled linearly with the global batch
(Goyal et al., "Accurate, Large Minibatch SGD", 2017) and capped, with a linear warm-up over
the first 5% of the steps and a cosine decay to 0. The test set is evaluated twice: with the
moving averages kept during training, and after :func:`normkit.recompute_stats` (the paper's
"batch average", its Fig. 8). Under ``torchrun`` each rank trains on its shard with
DistributedDataParallel (gloo on CPU, NCCL on GPU) and rank 0 writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import Dataset, load_dataset, pooled
from .deps import has_module
from .model import ResNetSmall
from .norms import check_norm, layer_options, options_record, tracks_running_stats
from .progress import Progress

__all__ = ["ConfigError", "TrainConfig", "scaled_lr", "train", "config_error", "summary_line", "write_result"]


class ConfigError(ValueError):
    """An experiment setting that cannot run (the command line shows its one-line message)."""


@dataclass
class TrainConfig:
    """One run of the experiment. Batch size is per process (the paper's "per GPU").

    Args:
        norm: normalizer name for :func:`normkit.create_norm`. Default: ``'sn'``.
        batch_size: samples per step per process. Default: 32.
        epochs: passes over the (limited) training set. Default: 1.
        limit_train: use this many training samples (a fixed random subset); None: all.
        limit_test: evaluate on the first this many test samples; None: all.
        seed: seeds initialisation, data subset and order. Default: 0.
        width: channels of the first stage of :class:`ResNetSmall`. Default: 16.
        gn_groups: groups of ``'gn'`` layers, ``gcd(gn_groups, C)`` per layer. Default: 8.
        base_lr, ref_batch, max_lr: ``lr = min(max_lr, base_lr * global_batch / ref_batch)``.
            Defaults: 0.1, 32, 0.2.
        warmup: fraction of the steps with a linear warm-up. Default: 0.05.
        weight_decay: on conv and linear weights only. Default: 5e-4.
        recompute_samples, recompute_batch_size: training samples (over all processes) and
            batch size for the batch-average statistics. Defaults: 2048, 128.
        data_dir, dataset: see :func:`experiments.batch_size.data.load_dataset`.
        sync_stats: merge BN statistics across processes (``normkit.convert(model, "sync")``).
        threads: torch CPU threads. Default: 1 (bit-identical results run to run; a small-batch
            step gains nothing from a second thread; see ``docs/EXPERIMENT.md``). None: torch's
            default (cores / processes under torchrun).
        norm_momentum: weight of the new batch in the running averages (PyTorch convention:
            Keras' 0.99 is 0.01); None: the layer's default (0.1).
        pool: average-pool the train and test images by this factor before training
            (2: Fashion-MNIST at 14x14, 4x fewer pixels; small batches gain less, being bound
            by the fixed cost per layer call). Default: 1.

    Fields added after runs were stored (:data:`OPTIONAL_FIELDS`) are left out of
    :meth:`to_dict` at their default, so the config key of a run stored before they existed
    (``docs/study/runs``) still equals the one the sweep builds for it.
    """

    norm: str = "sn"
    batch_size: int = 32
    epochs: int = 1
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    seed: int = 0
    width: int = 16
    gn_groups: int = 8
    base_lr: float = 0.1
    ref_batch: int = 32
    max_lr: float = 0.2
    warmup: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    recompute_samples: int = 2048
    recompute_batch_size: int = 128
    data_dir: Optional[str] = None
    dataset: str = "auto"
    sync_stats: bool = False
    threads: Optional[int] = 1
    norm_momentum: Optional[float] = None
    pool: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The run's config key (``result.json``'s ``config``; a sweep reuses a run only when it is equal)."""
        out = dataclasses.asdict(self)
        for name, default in OPTIONAL_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out


#: Fields newer than the stored full-study runs, with the default at which to_dict omits them.
OPTIONAL_FIELDS: dict[str, Any] = {"pool": 1}


def config_error(cfg: TrainConfig) -> Optional[str]:
    """A one-line message for an invalid config, or None."""
    for name in ("batch_size", "epochs", "width", "gn_groups", "ref_batch", "recompute_samples", "recompute_batch_size", "pool"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            return f"{name.replace('_', '-')} must be a positive integer, got {value!r}"
    for name in ("limit_train", "limit_test", "threads"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            return f"{name.replace('_', '-')} must be a positive integer or omitted, got {value!r}"
    if not (cfg.base_lr > 0 and cfg.max_lr > 0 and 0 <= cfg.warmup < 1):
        return f"need base-lr > 0, max-lr > 0 and 0 <= warmup < 1, got {cfg.base_lr}, {cfg.max_lr}, {cfg.warmup}"
    try:
        check_norm(cfg.norm)
    except ValueError as err:
        return str(err)
    if cfg.norm_momentum is not None:
        if not 0 < cfg.norm_momentum <= 1:
            return f"norm momentum must be in (0, 1] (the weight of the new batch), got {cfg.norm_momentum!r}"
        if not tracks_running_stats(cfg.norm):
            return f"norm momentum needs a normalizer with running averages (bn, sn, ...), got {cfg.norm!r}"
    return None


def scaled_lr(batch_size: int, world_size: int = 1, base_lr: float = 0.1, ref_batch: int = 32, max_lr: float = 0.2) -> float:
    """Linear scaling rule: ``min(max_lr, base_lr * batch_size * world_size / ref_batch)``."""
    return min(max_lr, base_lr * batch_size * world_size / ref_batch)


def _lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 0."""
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


class _Dist:
    """Rank, world size and collectives; a no-op stand-in without torchrun."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.started = False
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            self.started = True
        self.device = torch.device("cpu")
        if self.world > 1 and torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started:
            dist.destroy_process_group()


def _train_subset(data: Dataset, cfg: TrainConfig) -> Tensor:
    n = len(data.train_labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    return order[: cfg.limit_train] if cfg.limit_train else order


def _batches(data: Dataset, indices: Tensor, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(indices) - batch_size + 1, batch_size):
        idx = indices[start : start + batch_size]
        yield data.batch(data.train_images, idx).to(device), data.train_labels[idx].to(device)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv / linear weights; none on norm parameters, SN logits and biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            target = decay if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight" else no_decay
            target.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, limit: Optional[int], device: torch.device, batch_size: int = 500) -> float:
    """Top-1 accuracy on the (first ``limit``) test samples, model in eval mode."""
    model.eval()
    n = min(limit or len(data.test_labels), len(data.test_labels))
    correct = 0
    for start in range(0, n, batch_size):
        x = data.batch(data.test_images[start : min(n, start + batch_size)]).to(device)
        y = data.test_labels[start : min(n, start + batch_size)].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / n


def _has_running_stats(model: nn.Module) -> bool:
    return any(getattr(m, "running_mean", None) is not None for m in model.modules())


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def train(
    cfg: TrainConfig,
    out_dir: Optional[str] = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data: Optional[Dataset] = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` and return the result dict (written to ``out_dir/result.json`` by rank 0).

    A run has no checkpoint: an interrupted run starts again from step 0. For a switchable
    normalizer, rank 0 also writes ``importance.txt`` and, with ``plots`` and matplotlib,
    ``importance.png``, both after ``result.json``. ``data`` skips loading (a sweep loads
    once). Raises :class:`ConfigError` for a bad config and
    :class:`experiments.batch_size.data.DataError` for missing or corrupt data.
    """
    message = config_error(cfg)
    if message:
        raise ConfigError(message)
    env = _Dist()
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif env.world > 1:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        if data is None:
            data, notice = load_dataset(cfg.data_dir, cfg.dataset)
            if notice and env.main:
                log(notice)
        result = _run(cfg, data, env, progress and env.main)
        if env.main:
            if out_dir:
                write_result(result, out_dir, plots=plots, log=log)
            log(summary_line(result))
        env.barrier()
        return result
    finally:
        torch.set_num_threads(threads)
        env.close()


def _run(cfg: TrainConfig, data: Dataset, env: _Dist, progress: bool) -> dict[str, Any]:
    from normkit import convert, importance_report, recompute_stats

    start, cpu_at_start = time.perf_counter(), time.process_time()
    data = pooled(data, cfg.pool)
    subset = _train_subset(data, cfg)
    per_rank = len(subset) // env.world
    steps_per_epoch = per_rank // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"batch-size {cfg.batch_size} is larger than the {per_rank} training samples per process; "
            "lower --batch-size or raise --limit-train"
        )
    total_steps = steps_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    options = layer_options(cfg.norm, cfg.batch_size, cfg.norm_momentum, total_steps)
    model = ResNetSmall(cfg.norm, num_classes=data.num_classes, width=cfg.width, gn_groups=cfg.gn_groups, **options)
    model.to(env.device)
    if cfg.sync_stats and env.world > 1:
        convert(model, "sync")
    net: nn.Module = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    peak_lr = scaled_lr(cfg.batch_size, env.world, cfg.base_lr, cfg.ref_batch, cfg.max_lr)
    optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=peak_lr, momentum=cfg.momentum, nesterov=True)
    order_rng = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    step = 0
    bar = Progress(total_steps, f"{cfg.norm} batch {cfg.batch_size} seed {cfg.seed}", enabled=progress)
    cpu_start = time.process_time()
    for epoch in range(cfg.epochs):
        net.train()
        order = subset[torch.randperm(len(subset), generator=order_rng)]
        shard = order[env.rank :: env.world][:per_rank]
        loss_sum = correct = seen = 0.0
        for x, y in _batches(data, shard, cfg.batch_size, env.device):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, peak_lr, cfg.warmup)
            logits = net(x)
            loss = nn.functional.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.norm} batch {cfg.batch_size}: loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(1, f"epoch {epoch + 1}/{cfg.epochs}, loss {loss_sum / seen:.3f}")
        loss_sum, correct, seen = env.sum([loss_sum, correct, seen])
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen})
    bar.close()
    train_time = time.perf_counter() - start
    train_cpu = time.process_time() - cpu_start

    # Test with the moving averages, then with the batch-average statistics (paper, Fig. 8).
    acc_moving = evaluate(model, data, cfg.limit_test, env.device) if env.main else float("nan")
    recompute_note = "no running statistics: nothing to recompute"
    acc_recomputed = acc_moving
    if _has_running_stats(model):
        rec_order = subset[torch.randperm(len(subset), generator=torch.Generator().manual_seed(cfg.seed + 2))]
        per_rank_rec = min(cfg.recompute_samples, len(subset)) // env.world
        rec_shard = rec_order[env.rank :: env.world][:per_rank_rec]
        rec_batch = min(cfg.recompute_batch_size, max(1, per_rank_rec))
        report = recompute_stats(model, _batches(data, rec_shard, rec_batch, env.device))
        recompute_note = str(report)
        if env.main:
            acc_recomputed = evaluate(model, data, cfg.limit_test, env.device)
    wall = time.perf_counter() - start

    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "dataset": data.name,
        "image_size": list(data.train_images.shape[-2:]),
        "train_samples": per_rank * env.world,
        "test_samples": min(cfg.limit_test or len(data.test_labels), len(data.test_labels)),
        "world_size": env.world,
        "cpu_kernels": {"aten": torch.backends.cpu.get_cpu_capability(),
                        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "auto")},
        "global_batch": cfg.batch_size * env.world,
        "layer_options": options_record(options),
        "steps": total_steps,
        "peak_lr": peak_lr,
        "lr_rule": (
            f"lr = min({cfg.max_lr}, {cfg.base_lr} * global_batch / {cfg.ref_batch}), linear warm-up over "
            f"{cfg.warmup:.0%} of the steps, cosine decay to 0"
        ),
        "history": history,
        "test_accuracy": acc_moving,
        "test_accuracy_recomputed": acc_recomputed,
        "recompute": recompute_note,
        "train_seconds": train_time,
        "train_cpu_seconds": train_cpu,
        # per process: the training loop only (forward, backward, step), not the evaluation
        "samples_per_second": total_steps * cfg.batch_size / train_time if train_time > 0 else float("nan"),
        "wall_seconds": wall,
        "cpu_seconds": time.process_time() - cpu_at_start,  # the whole run, evaluation included
        "machine": _machine(),
    }
    if env.main:
        weights = importance_report(model)
        if len(weights):
            result["importance"] = weights.to_dicts()
    return result


def write_result(result: dict[str, Any], out_dir: str, *, plots: bool = True, log: Callable[[str], None] = print) -> None:
    """Write ``result.json`` (atomically: a killed run leaves none), then the extras of a
    switchable normalizer: ``importance.txt`` and, with ``plots`` and matplotlib, ``importance.png``."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "result.json"))
    rows = result.get("importance")
    if not rows:
        return
    keys = [k for k in rows[0] if k != "layer"]
    with open(os.path.join(out_dir, "importance.txt"), "w") as f:
        f.write("layer".ljust(22) + "".join(f"{k.split('_')[0]} {k.split('_')[1].upper()}".rjust(9) for k in keys) + "\n")
        for row in rows:
            f.write(row["layer"].ljust(22) + "".join(f"{row[k]:9.3f}" for k in keys) + "\n")
    if plots and has_module("matplotlib"):
        from .plots import plot_run_importance

        cfg = result["config"]
        plot_run_importance(rows, os.path.join(out_dir, "importance.png"),
                            title=f"{cfg['norm'].upper()} importance weights, batch {cfg['batch_size']}, seed {cfg['seed']}")


def summary_line(result: dict[str, Any]) -> str:
    """One line per run: config, steps, lr, both test accuracies, speed, time."""
    cfg = result["config"]
    momentum = "" if cfg.get("norm_momentum") is None else f" momentum {cfg['norm_momentum']}"
    return (
        f"{cfg['norm']:>3} batch {cfg['batch_size']:>3} seed {cfg['seed']}{momentum} x{result['world_size']} | "
        f"{cfg['epochs']} ep, {result['steps']} steps, lr {result['peak_lr']:.4g} | test acc "
        f"{result['test_accuracy']:.2%} moving avg, {result['test_accuracy_recomputed']:.2%} batch avg | "
        f"{result['samples_per_second']:.0f} samples/s, {result['wall_seconds']:.0f} s"
    )
