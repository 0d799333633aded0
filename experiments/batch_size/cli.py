"""The command line of the SN paper's batch-size experiment, run from the repository root.

``python -m experiments.batch_size train`` trains and evaluates one normalizer at one batch
size; ``python -m experiments.batch_size sweep`` runs the grid and writes the table and
figures (Luo et al., ICLR 2019, Table 2 and Fig. 1). See ``docs/EXPERIMENT.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import NoReturn, Optional, Sequence

__all__ = ["main", "build_parser", "PROG", "NORM_NAMES"]

#: The command, as usage lines and error messages name it.
PROG = "python -m experiments.batch_size"

#: The normalizer names this command line offers (aliases of one kind listed together); each
#: is a name :func:`normkit.create_norm` accepts.
NORM_NAMES = ("bn/batch", "sn/switch", "gn/group", "ln/layer", "in/instance", "none/identity")

#: The default sweep: the README's main command, about 10 minutes on 2 CPU cores.
DEFAULT_NORMS = "bn,gn,sn"
DEFAULT_BATCH_SIZES = "2,8,32"
DEFAULT_SWEEP_LIMIT_TRAIN = 6000
DEFAULT_SWEEP_LIMIT_TEST = 5000


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``python -m experiments.batch_size train: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _norm_name(text: str) -> str:
    from normkit import create_norm

    try:
        create_norm(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown norm {text!r}; valid names are {', '.join(NORM_NAMES)}") from None
    return text.lower()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip().lstrip("+"):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _norm_list(text: str) -> list[str]:
    names = [_norm_name(t.strip()) for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated norm names like bn,gn,sn, got {text!r}")
    return list(dict.fromkeys(names))


def _size_list(text: str) -> list[int]:
    sizes = [_positive(t.strip()) for t in text.split(",") if t.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive batch sizes like 2,8,32, got {text!r}")
    return sorted(set(sizes))


def _common(p: argparse.ArgumentParser, limit_train: Optional[int], limit_test: Optional[int], threads: Optional[int]) -> None:
    p.add_argument("--epochs", type=_positive, default=1, help="passes over the training samples (default: 1)")
    p.add_argument(
        "--limit-train", type=_positive, default=limit_train, metavar="N",
        help=f"train on a fixed random subset of N samples (default: {limit_train or 'all'})",
    )
    p.add_argument(
        "--limit-test", type=_positive, default=limit_test, metavar="N",
        help=f"evaluate on the first N test samples (default: {limit_test or 'all'})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, subset and order (default: 0)")
    p.add_argument("--width", type=_positive, default=16, help="channels of the first stage of the CNN (default: 16)")
    p.add_argument("--gn-groups", type=_positive, default=8, help="groups of GN layers (default: 8)")
    p.add_argument(
        "--lr", type=float, default=0.1, metavar="LR",
        help="learning rate at the reference batch 32, scaled linearly with the global batch (default: 0.1)",
    )
    p.add_argument("--max-lr", type=float, default=0.2, help="cap of the scaled learning rate (default: 0.2)")
    p.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help="directory with the Fashion-MNIST IDX files, gzipped or not "
        "(default: /usr/share/datasets/fashion-mnist, falling back to scikit-learn's digits if absent)",
    )
    p.add_argument(
        "--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto",
        help="'auto': Fashion-MNIST, or digits when the default directory is absent (default: auto)",
    )
    p.add_argument(
        "--threads", type=_positive, default=threads,
        help=f"torch CPU threads (default: {threads or 'torch default'}; small batches gain nothing from more, "
        "and on a busy machine extra threads spin-wait)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (the one-line summaries and notices stay)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Switchable Normalization vs BN / GN across batch sizes on Fashion-MNIST (Luo et al., ICLR 2019).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sweep}", parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train and evaluate one normalizer at one batch size",
        description="Train the small residual CNN with one normalizer; writes OUT/result.json "
        "(and importance.png / importance.txt for SN). Runs under torchrun too (DistributedDataParallel).",
    )
    t.add_argument("--norm", type=_norm_name, required=True, help="bn, gn, ln, in, sn (or batch, group, ...)")
    t.add_argument("--batch-size", type=_positive, required=True, metavar="B", help="samples per step per process")
    _common(t, None, None, None)
    t.add_argument("--out", default=None, metavar="DIR", help="output directory (default: runs/<norm>-b<B>)")
    t.add_argument(
        "--sync-stats", action="store_true",
        help="under torchrun, merge BN statistics across processes (normkit.convert(model, 'sync'))",
    )

    s = sub.add_parser(
        "sweep", help="run the norm x batch-size grid and write the table and plots",
        description="Run every norm at every batch size on the same training samples, with the learning "
        "rate scaled with the batch; resumes from OUT. Writes results.json, results.md, "
        "accuracy_vs_batch.png and importance_vs_batch.png.",
    )
    s.add_argument("--norms", type=_norm_list, default=_norm_list(DEFAULT_NORMS), help=f"default: {DEFAULT_NORMS}")
    s.add_argument(
        "--batch-sizes", type=_size_list, default=_size_list(DEFAULT_BATCH_SIZES), metavar="LIST",
        help=f"per-process batch sizes (default: {DEFAULT_BATCH_SIZES})",
    )
    _common(s, DEFAULT_SWEEP_LIMIT_TRAIN, DEFAULT_SWEEP_LIMIT_TEST, 1)
    s.add_argument("--out", default="normkit-sweep", metavar="DIR", help="output directory (default: normkit-sweep)")
    return parser


def _config(args: argparse.Namespace, norm: str, batch_size: int):
    from .train import TrainConfig

    return TrainConfig(
        norm=norm, batch_size=batch_size, epochs=args.epochs, limit_train=args.limit_train,
        limit_test=args.limit_test, seed=args.seed, width=args.width, gn_groups=args.gn_groups,
        base_lr=args.lr, max_lr=args.max_lr, data_dir=args.data_dir, dataset=args.dataset,
        sync_stats=getattr(args, "sync_stats", False), threads=args.threads,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m experiments.batch_size``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .train import ConfigError

    command = PROG + " " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "train":
            from .train import train

            out = args.out or os.path.join("runs", f"{args.norm}-b{args.batch_size}")
            train(_config(args, args.norm, args.batch_size), out, progress=not args.quiet)
        else:
            from .sweep import sweep

            sweep(
                _config(args, args.norms[0], args.batch_sizes[0]), args.norms, args.batch_sizes, args.out,
                progress=not args.quiet, command=command,
            )
    except (ConfigError, DataError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
