"""Synchronised SN on the fused path: what a synced training step costs over an unsynced one.

Two (``--world``) gloo processes on this machine, one thread each. Per shape (per-rank batch),
every repetition runs, in a shuffled order:

* ``unsynced``: ``SwitchNorm2d`` forward+backward, no process group (the fused C operator);
* ``synced``: the same layer with ``process_group=WORLD`` (the generic fused path: the C
  passes around the Python mix, whose batch statistics are exchanged by one ``all_reduce``
  forward and one backward);
* ``synced, reference``: the same under ``normkit.use_backend("reference")`` (the path synced
  layers took before);
* ``2 x all_reduce``: the two collectives alone, on the buffer a synced layer exchanges
  (``(world, 3, C)`` float32).

The table gives rank 0's medians and the split ``synced - unsynced`` against ``2 x
all_reduce``: what the exchange costs beyond the collectives themselves is the generic
path's Python mix.

    python benchmarks/bench_sync.py            # 3 shapes, 15 repetitions
    python benchmarks/bench_sync.py --quick    # 1 shape, 5 repetitions
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normkit

FULL_SHAPES = [(2, 64, 7, 7), (8, 32, 14, 14), (8, 64, 32, 32)]
QUICK_SHAPES = [(2, 64, 7, 7)]


def _step(layer, x, grad):
    def run():
        x.grad = None
        layer(x).backward(grad)
    return run


def _reference_step(layer, x, grad):
    def run():
        with normkit.use_backend("reference"):
            x.grad = None
            layer(x).backward(grad)
    return run


def _collectives(c, world):
    buf = torch.zeros(world, 3, c)

    def run():
        dist.all_reduce(buf)
        dist.all_reduce(buf)
    return run


def _worker(rank, world, init_file, shapes, reps, inner, out_file):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    group = dist.group.WORLD
    rows = []
    for shape in shapes:
        torch.manual_seed(rank)
        c = shape[1]
        x, grad = torch.randn(shape, requires_grad=True), torch.randn(shape)
        plain, synced = normkit.SwitchNorm2d(c), normkit.SwitchNorm2d(c, process_group=group)
        cases = {"unsynced": _step(plain, x, grad), "synced": _step(synced, x, grad),
                 "synced, reference": _reference_step(synced, x, grad), "2 x all_reduce": _collectives(c, world)}
        times = {name: [] for name in cases}
        order = random.Random(0)  # the same order on every rank: the collectives must pair up
        for _ in range(3):
            for fn in cases.values():
                fn()
        for _ in range(reps):
            names = list(cases)
            order.shuffle(names)
            for name in names:
                dist.barrier()
                start = time.perf_counter()
                for _ in range(inner):
                    cases[name]()
                times[name].append((time.perf_counter() - start) / inner * 1e6)
        rows.append((shape, {name: statistics.median(v) for name, v in times.items()}))
    if rank == 0:
        torch.save(rows, out_file)
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, 5 repetitions")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--inner", type=int, default=20, help="calls per timed block")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    reps = args.reps or (5 if args.quick else 15)
    with tempfile.TemporaryDirectory(prefix="nk-sync-") as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "init"), shapes, reps, args.inner, out),
                           nprocs=args.world, start_method="spawn")
        rows = torch.load(out, weights_only=False)
    print(f"{args.world} gloo processes, 1 thread each; per-rank shape; median us per step on rank 0 "
          f"({reps} shuffled repetitions of {args.inner} calls)")
    print("| N,C,H,W per rank | unsynced | synced | synced, reference | 2 x all_reduce | synced - unsynced | synced / unsynced |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape, t in rows:
        extra = t["synced"] - t["unsynced"]
        print(f"| {','.join(map(str, shape))} | {t['unsynced']:.0f} | {t['synced']:.0f} | {t['synced, reference']:.0f} "
              f"| {t['2 x all_reduce']:.0f} | {extra:.0f} | {t['synced'] / t['unsynced']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
