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

from .data import Dataset, load_dataset
from .model import ResNetSmall

__all__ = ["ConfigError", "TrainConfig", "scaled_lr", "train", "config_error", "summary_line"]


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
        threads: torch CPU threads; None: torch's default (cores / processes under torchrun).
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
    threads: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_error(cfg: TrainConfig) -> Optional[str]:
    """A one-line message for an invalid config, or None."""
    for name in ("batch_size", "epochs", "width", "gn_groups", "ref_batch", "recompute_samples", "recompute_batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            return f"{name.replace('_', '-')} must be a positive integer, got {value!r}"
    for name in ("limit_train", "limit_test", "threads"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            return f"{name.replace('_', '-')} must be a positive integer or omitted, got {value!r}"
    if not (cfg.base_lr > 0 and cfg.max_lr > 0 and 0 <= cfg.warmup < 1):
        return f"need base-lr > 0, max-lr > 0 and 0 <= warmup < 1, got {cfg.base_lr}, {cfg.max_lr}, {cfg.warmup}"
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
) -> dict[str, Any]:
    """Train ``cfg`` and return the result dict (written to ``out_dir/result.json`` by rank 0).

    For SN, rank 0 also writes ``importance.png`` and ``importance.txt`` to ``out_dir``.
    ``data`` skips loading (a sweep loads once). Raises :class:`ConfigError` for a bad config and
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
        return _run(cfg, out_dir, data, env, progress and env.main, log)
    finally:
        torch.set_num_threads(threads)
        env.close()


def _run(
    cfg: TrainConfig, out_dir: Optional[str], data: Dataset, env: _Dist, progress: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from normkit import convert, importance_report, plot_importance, recompute_stats

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = ResNetSmall(cfg.norm, num_classes=data.num_classes, width=cfg.width, gn_groups=cfg.gn_groups).to(env.device)
    if cfg.sync_stats and env.world > 1:
        convert(model, "sync")
    net: nn.Module = model
    if env.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    subset = _train_subset(data, cfg)
    per_rank = len(subset) // env.world
    steps_per_epoch = per_rank // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"batch-size {cfg.batch_size} is larger than the {per_rank} training samples per process; "
            "lower --batch-size or raise --limit-train"
        )
    total_steps = steps_per_epoch * cfg.epochs
    peak_lr = scaled_lr(cfg.batch_size, env.world, cfg.base_lr, cfg.ref_batch, cfg.max_lr)
    optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=peak_lr, momentum=cfg.momentum, nesterov=True)
    order_rng = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    step = 0
    epochs = tqdm(range(cfg.epochs), desc=f"{cfg.norm} b{cfg.batch_size}", unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        net.train()
        order = subset[torch.randperm(len(subset), generator=order_rng)]
        shard = order[env.rank :: env.world][:per_rank]
        loss_sum = correct = seen = 0.0
        bar = tqdm(
            _batches(data, shard, cfg.batch_size, env.device), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step", disable=not progress, leave=False, mininterval=0.5,
        )
        for x, y in bar:
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
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        loss_sum, correct, seen = env.sum([loss_sum, correct, seen])
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen})
    train_time = time.perf_counter() - start

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
        "train_samples": per_rank * env.world,
        "test_samples": min(cfg.limit_test or len(data.test_labels), len(data.test_labels)),
        "world_size": env.world,
        "global_batch": cfg.batch_size * env.world,
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
        "wall_seconds": wall,
        "machine": _machine(),
    }
    if env.main:
        report = importance_report(model)
        if len(report):
            result["importance"] = report.to_dicts()
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            if len(report):
                plot_importance(report, os.path.join(out_dir, "importance.png"), title=f"SN importance weights, batch {cfg.batch_size}")
                with open(os.path.join(out_dir, "importance.txt"), "w") as f:
                    f.write(str(report) + "\n")
            tmp = os.path.join(out_dir, "result.json.tmp")
            with open(tmp, "w") as f:
                json.dump(result, f, indent=2)
            os.replace(tmp, os.path.join(out_dir, "result.json"))  # atomic: a killed run leaves no result
        log(summary_line(result))
    env.barrier()
    return result


def summary_line(result: dict[str, Any]) -> str:
    """One line per run: config, steps, lr, both test accuracies, time."""
    cfg = result["config"]
    return (
        f"{cfg['norm']:>3} batch {cfg['batch_size']:>4} x{result['world_size']} | {cfg['epochs']} ep, "
        f"{result['steps']} steps, lr {result['peak_lr']:.4g} | test acc {result['test_accuracy']:.2%} moving avg, "
        f"{result['test_accuracy_recomputed']:.2%} batch avg | {result['wall_seconds']:.0f} s"
    )
