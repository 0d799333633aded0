"""The command line of the batch-size study, run from the repository root.

``python -m experiments.batch_size train`` trains and evaluates one normalizer at one batch
size and seed; ``python -m experiments.batch_size sweep`` runs the grid (the demo by default,
``--full`` for the whole study) and writes the tables, figures and summary (Luo et al.,
ICLR 2019, Table 2, Fig. 1 and Fig. 8). See ``docs/EXPERIMENT.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import NoReturn, Optional, Sequence

__all__ = ["main", "build_parser", "PROG", "DEMO", "FULL", "check_dependencies"]

#: The command, as usage lines and error messages name it.
PROG = "python -m experiments.batch_size"

#: Every output goes under this folder (git ignores it): ``runs/train/...``, ``runs/sweep``,
#: ``runs/full``; ``scripts/demo.sh`` writes ``runs/demo``.
RUNS = "runs"

#: The demo grid, the README's main command (about 11 minutes on 2 idle cores, see
#: docs/EXPERIMENT.md for the measurement and how this budget was chosen).
DEMO = {
    "batch_sizes": "1,2,4,8,16,32", "seeds": "0,1,2", "epochs": 2, "limit_train": 2000, "limit_test": 5000, "pool": 2,
    "momenta": "0.01,0.003", "momentum_norms": "bn", "momentum_batch": 2, "out": os.path.join(RUNS, "sweep"),
}
#: The full study: the same grid on all 60000 training images at 28x28 and all 10000 test images.
#: Its run config must stay as it is: the sweep reuses the committed runs of docs/study/runs
#: only when their stored config equals the one it builds (``pool`` 1 is left out of the key).
FULL = {**DEMO, "epochs": 4, "limit_train": None, "limit_test": None, "pool": 1, "out": os.path.join(RUNS, "full")}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``python -m experiments.batch_size train: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _norm_name(text: str) -> str:
    from .norms import check_norm

    try:
        return check_norm(text)
    except ValueError as err:  # create_norm's message lists the valid names
        raise argparse.ArgumentTypeError(str(err)) from None


def _number(kind, text: str, valid, expected: str):
    """``text`` as ``kind`` if ``valid(value)``, else the one-line argparse error ``expected ..., got ...``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value) or (kind is int and str(value) != text.strip().lstrip("+")):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def _seed(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "a non-negative integer seed")


def _momentum(text: str) -> float:
    return _number(float, text, lambda v: 0 < v <= 1, "a momentum in (0, 1] (weight of the new batch, Keras' 0.99 is 0.01)")


def _list_of(parse, example: str):
    def parse_list(text: str) -> list:
        items = [parse(t.strip()) for t in str(text).split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list like {example}, got {text!r}")
        return list(dict.fromkeys(items))

    return parse_list


_norm_list = _list_of(_norm_name, "bn,gn,sn")
_size_list = _list_of(_positive, "2,8,32")
_seed_list = _list_of(_seed, "0,1,2")
_momentum_list = _list_of(_momentum, "0.01,0.003")


def _common(p: argparse.ArgumentParser) -> None:
    # Defaults of None are filled in by main() (the sweep's from DEMO or FULL).
    p.add_argument("--epochs", type=_positive, default=None, help="passes over the training samples (train: 1)")
    p.add_argument("--limit-train", type=_positive, default=None, metavar="N", help="train on a fixed random subset of N samples (train: all)")
    p.add_argument("--limit-test", type=_positive, default=None, metavar="N", help="evaluate on the first N test samples (train: all)")
    p.add_argument("--pool", type=_positive, default=None, metavar="K",
                   help="average-pool the images by K before training (2: 14x14, 4x fewer pixels, 1.3x to 2.6x faster per sample; "
                   f"default: {DEMO['pool']} for the demo sweep, 1 for train and sweep --full)")
    p.add_argument("--width", type=_positive, default=16, help="channels of the first stage of the CNN (default: 16)")
    p.add_argument("--gn-groups", type=_positive, default=8, help="groups of GN layers (default: 8)")
    p.add_argument("--lr", type=float, default=0.1, metavar="LR",
                   help="learning rate at the reference batch 32, scaled linearly with the global batch (default: 0.1)")
    p.add_argument("--max-lr", type=float, default=0.2, help="cap of the scaled learning rate (default: 0.2)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory with the Fashion-MNIST IDX files, gzipped or not "
                   "(default: /usr/share/datasets/fashion-mnist, falling back to scikit-learn's digits if absent)")
    p.add_argument("--dataset", choices=("auto", "fashion-mnist", "digits"), default="auto",
                   help="'auto': Fashion-MNIST, or digits when the default directory is absent (default: auto)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="torch CPU threads per process (default: 1: results are bit-identical run to run at a fixed "
                   "count, and a second thread makes the study's steps no faster; see docs/EXPERIMENT.md)")
    p.add_argument("--no-plots", action="store_true", help="write results and tables only, no figures (matplotlib not needed)")
    p.add_argument("--quiet", action="store_true", help="no progress output (notices, errors and the final summary stay)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Switchable Normalization vs BN / GN (and any normalizer normkit's create_norm builds) across "
        "batch sizes on Fashion-MNIST (Luo et al., ICLR 2019).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sweep}", parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train and evaluate one normalizer at one batch size and seed",
        description="Train the small residual CNN with one normalizer; writes OUT/result.json (and importance.txt / "
        "importance.png for a switchable normalizer). There is no checkpoint: an interrupted run starts again "
        "from step 0. Runs under torchrun too (DistributedDataParallel).",
    )
    t.add_argument("--norm", type=_norm_name, required=True, help="any name normkit.create_norm accepts: bn, gn, sn, ...")
    t.add_argument("--batch-size", type=_positive, required=True, metavar="B", help="samples per step per process")
    t.add_argument("--seed", type=_seed, default=0, help="seed of initialisation, subset and order (default: 0)")
    t.add_argument("--momentum", type=_momentum, default=None,
                   help="weight of the new batch in the running averages (default: the layer's, 0.1)")
    _common(t)
    t.add_argument("--out", default=None, metavar="DIR", help=f"output directory (default: {RUNS}/train/<norm>-b<B>-s<seed>)")
    t.add_argument("--sync-stats", action="store_true",
                   help="under torchrun, merge BN statistics across processes (normkit.convert(model, 'sync'))")

    s = sub.add_parser(
        "sweep", help="run the norm x batch size x seed grid and write the summary, tables and figures",
        description="Run every norm at every batch size and seed, and the momentum sweep, with the learning rate "
        "scaled with the batch; reuses the finished runs in OUT. Defaults: the demo grid; --full: the whole study.",
    )
    s.add_argument("--full", action="store_true",
                   help=f"the full study: {FULL['epochs']} epochs on all training and test images (out: {FULL['out']})")
    s.add_argument("--norms", type=_norm_list, default=None,
                   help="default: those of bn, gn, sn, brn, ssn that normkit builds")
    s.add_argument("--batch-sizes", type=_size_list, default=None, metavar="LIST", help=f"per-process batch sizes (default: {DEMO['batch_sizes']})")
    s.add_argument("--seeds", type=_seed_list, default=None, metavar="LIST", help=f"seeds per cell (default: {DEMO['seeds']})")
    s.add_argument("--momenta", type=_momentum_list, default=None, metavar="LIST",
                   help=f"running-average momenta of the momentum sweep, beside the default 0.1 (default: {DEMO['momenta']})")
    s.add_argument("--momentum-norms", type=_norm_list, default=None, metavar="LIST",
                   help=f"normalizers of the momentum sweep (default: {DEMO['momentum_norms']})")
    s.add_argument("--momentum-batch", type=_positive, default=None, metavar="B",
                   help=f"batch size of the momentum sweep (default: {DEMO['momentum_batch']})")
    s.add_argument("--no-momentum-sweep", action="store_true", help="only the norm x batch size x seed grid")
    s.add_argument("--jobs", type=_positive, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel, one process each (default: 2, or 1 on a 1-core machine); the numbers do not depend on it")
    _common(s)
    s.add_argument("--out", default=None, metavar="DIR", help=f"output directory (default: {DEMO['out']}, with --full {FULL['out']})")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        normkit_version = version("normkit")
    except PackageNotFoundError:
        normkit_version = "not installed"
    return f"{PROG} {__version__} (normkit {normkit_version})"


def check_dependencies(args: argparse.Namespace, log=print) -> None:
    """Before any training: a missing optional package is an error when the command needs it
    (scikit-learn for the digits fallback) and a notice when it only loses an extra (figures)."""
    from .data import DEFAULT_DATA_DIR
    from .deps import has_module, require

    require("numpy", "numpy", "reading the data")
    digits = args.dataset == "digits" or (args.dataset == "auto" and args.data_dir is None and not os.path.isdir(DEFAULT_DATA_DIR))
    if digits:
        require("sklearn", "scikit-learn", "the digits data set (used when Fashion-MNIST is absent)",
                "install Fashion-MNIST (apt install dataset-fashion-mnist) or pass --data-dir")
    if not args.no_plots and not has_module("matplotlib"):
        log(f"notice: matplotlib is not installed, so no figures will be drawn (results and tables are written); "
            f"pip install matplotlib, or pass --no-plots to silence this")
        args.no_plots = True


def _fill_sweep_defaults(args: argparse.Namespace) -> None:
    from .norms import available_norms

    preset = FULL if args.full else DEMO
    for name in ("epochs", "limit_train", "limit_test", "pool", "momentum_batch", "out"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    parsers = {"batch_sizes": _size_list, "seeds": _seed_list, "momenta": _momentum_list, "momentum_norms": _norm_list}
    for name, parse in parsers.items():
        if getattr(args, name) is None:
            setattr(args, name, parse(preset[name]))
    if args.norms is None:
        args.norms = available_norms()
    if args.no_momentum_sweep:
        args.momenta, args.momentum_norms = [], []


def _config(args: argparse.Namespace, norm: str, batch_size: int):
    from .train import TrainConfig

    return TrainConfig(
        norm=norm, batch_size=batch_size, epochs=args.epochs, limit_train=args.limit_train,
        limit_test=args.limit_test, seed=getattr(args, "seed", 0), width=args.width, gn_groups=args.gn_groups,
        base_lr=args.lr, max_lr=args.max_lr, data_dir=args.data_dir, dataset=args.dataset,
        sync_stats=getattr(args, "sync_stats", False), threads=args.threads, norm_momentum=getattr(args, "momentum", None),
        pool=args.pool,
    )


# torch picks its CPU kernels by the machine's instruction set: ATen's vectorized loops and
# oneDNN's convolutions add in other orders with AVX-512 than with AVX2, which moves a run's
# test accuracy by up to 0.3 points (BN batch 32, demo). The committed runs used the AVX2
# kernels; pinning them makes every x86-64 machine with AVX2 give the same digits. A value
# already in the environment wins.
CPU_KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _has_avx2(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx2" in flags and "fma" in flags
    except OSError:
        pass
    return False


def pin_cpu_kernels(environ=os.environ) -> dict[str, str]:
    """Pin torch's CPU kernels to AVX2 (see ``CPU_KERNEL_PINS``) on a machine that has it,
    before torch computes anything: the command line calls it first. Returns what it set."""
    if not _has_avx2():
        return {}
    pins = {k: v for k, v in CPU_KERNEL_PINS.items() if k not in environ}
    environ.update(pins)
    return pins


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m experiments.batch_size``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .deps import MissingDependency
    from .train import ConfigError

    command = PROG + " " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.command == "train":
        args.epochs = args.epochs or 1
        args.pool = args.pool or 1
        args.out = args.out or os.path.join(RUNS, "train", f"{args.norm}-b{args.batch_size}-s{args.seed}")
    else:
        _fill_sweep_defaults(args)
    try:
        check_dependencies(args, log=lambda line: print(line, file=sys.stderr))
        if args.command == "train":
            from .train import train

            train(_config(args, args.norm, args.batch_size), args.out, progress=not args.quiet, plots=not args.no_plots)
        else:
            from .sweep import Grid, sweep

            grid = Grid(args.norms, args.batch_sizes, args.seeds, args.momenta, args.momentum_norms, args.momentum_batch)
            sweep(_config(args, args.norms[0], args.batch_sizes[0]), grid, args.out, jobs=args.jobs,
                  progress=not args.quiet, plots=not args.no_plots, command=command)
    except (ConfigError, DataError, MissingDependency) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except KeyboardInterrupt:
        if args.command == "train":
            hint = "train keeps no checkpoint, so running it again starts from step 0 (a sweep reuses its finished runs)"
        else:
            hint = f"the finished runs are kept in {os.path.join(args.out, 'runs')} and the same command continues from them"
        print(f"{PROG} {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    return 0
