"""Batch Renorm and Sparse SN against their peers, as time ratios measured in one run.

* BRN forward+backward (training, correction active: ``warmup=(0, 0, 0)``) / normkit BN;
* BRN in its warm-up (``r_max = 1, d_max = 0``) / normkit BN;
* SSN forward+backward (radius 0.45: the sphere branch) / normkit SN;
* SSN eval, one-hot and not hardened / the same layer hardened (the plain layer it chose).

Every repetition runs all candidates of a shape in a shuffled order; the table gives the
median time of each and the ratio of the medians. One thread by default, so that the
ratios say what the layers cost rather than how they share cores.

    python benchmarks/bench_renorm_ssn.py            # full shapes, 15 repetitions
    python benchmarks/bench_renorm_ssn.py --quick    # two small shapes, 5 repetitions
    python benchmarks/bench_renorm_ssn.py --clock cpu --only ssn --reps 41   # SSN / SN only,
        # timed in this thread's CPU time: on a machine shared with other jobs, wall-clock
        # time counts the time the thread waits for a core, CPU time does not

``--clock cpu`` also prints the median of the per-repetition ratios (each repetition times
SSN and SN back to back, so a slow stretch of the machine hits both).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import normkit

FULL_SHAPES = [(2, 64, 7, 7), (8, 32, 14, 14), (16, 64, 28, 28), (32, 64, 32, 32)]
QUICK_SHAPES = [(2, 64, 7, 7), (8, 32, 14, 14)]


def _train_step(layer, x, grad):
    def run():
        x.grad = None
        layer(x).backward(grad)
    return run


def _eval_step(layer, x):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def _candidates(shape, only=None):
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    bn = normkit.BatchNorm2d(c)
    brn = normkit.BatchRenorm2d(c, warmup=(0, 0, 0))
    brn_warmup = normkit.BatchRenorm2d(c)  # the paper's schedule: r_max = 1, d_max = 0 at first
    sn = normkit.SwitchNorm2d(c)
    ssn = normkit.SparseSwitchNorm2d(c, radius=0.45, radius_steps=None)
    with torch.no_grad():
        for layer in (sn, ssn):
            layer.mean_logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
            layer.var_logits.copy_(torch.tensor([-0.1, 0.2, 0.4]))
    one_hot = normkit.SparseSwitchNorm2d(c, radius=1.0, radius_steps=None).eval()
    with torch.no_grad():
        one_hot.mean_logits.copy_(torch.tensor([0.0, 0.0, 1.0]))
        one_hot.var_logits.copy_(torch.tensor([0.0, 0.0, 1.0]))
    with torch.no_grad():
        hardened_src = normkit.SparseSwitchNorm2d(c, radius=1.0, radius_steps=None)
        hardened_src.mean_logits.copy_(torch.tensor([0.0, 0.0, 1.0]))
        hardened_src.var_logits.copy_(torch.tensor([0.0, 0.0, 1.0]))
    hardened = normkit.harden(hardened_src).eval()
    xe = x.detach()
    if only == "ssn":
        return {"sn": _train_step(sn, x, grad), "ssn": _train_step(ssn, x, grad)}
    return {
        "bn": _train_step(bn, x, grad),
        "brn": _train_step(brn, x, grad),
        "brn_warmup": _train_step(brn_warmup, x, grad),
        "sn": _train_step(sn, x, grad),
        "ssn": _train_step(ssn, x, grad),
        "ssn_eval_one_hot": _eval_step(one_hot, xe),
        "hardened_eval": _eval_step(hardened, xe),
    }


RATIOS = [
    ("BRN fwd+bwd / BN", "brn", "bn"),
    ("BRN warm-up fwd+bwd / BN", "brn_warmup", "bn"),
    ("SSN fwd+bwd / SN", "ssn", "sn"),
    ("SSN one-hot eval / hardened eval", "ssn_eval_one_hot", "hardened_eval"),
]


def measure(shape, reps: int, inner: int, seed: int, clock=time.perf_counter, only=None
            ) -> tuple[dict[str, float], dict[str, list[float]]]:
    fns = _candidates(shape, only)
    for fn in fns.values():  # warm up allocator, kernels and caches
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start = clock()
            for _ in range(inner):
                fns[name]()
            times[name].append((clock() - start) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, 5 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 15, quick 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", default=None, help="e.g. 32x64x32x32,8x32x14x14 (default: the full or quick set)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: this thread's CPU time (time.thread_time)")
    parser.add_argument("--only", choices=("ssn",), default=None, help="ssn: only SSN and SN")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    reps = args.reps or (5 if args.quick else 15)
    print(f"torch {torch.__version__}, {args.threads} thread(s), kernels: {normkit.kernels.status()['cpu']['kernels']}, "
          f"{reps} shuffled repetitions, medians, {args.clock} clock")
    if args.only == "ssn":
        print("| N,C,H,W | SSN fwd+bwd / SN (ratio of medians) | median of paired ratios | SN fwd+bwd us | SSN fwd+bwd us |")
        print("|---|---|---|---|---|")
    else:
        header = "| N,C,H,W | " + " | ".join(label for label, _, _ in RATIOS) + " | BN fwd+bwd us | SN fwd+bwd us |"
        print(header)
        print("|" + "---|" * (len(RATIOS) + 3))
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        inner = max(4, min(50, 2_000_000 // numel))  # at least a few calls per timed sample
        med, times = measure(shape, reps, inner, args.seed, clock, args.only)
        if args.only == "ssn":
            paired = statistics.median(a / b for a, b in zip(times["ssn"], times["sn"]))
            print(f"| {','.join(map(str, shape))} | {med['ssn'] / med['sn']:.3f} | {paired:.3f} "
                  f"| {med['sn'] * 1e6:.0f} | {med['ssn'] * 1e6:.0f} |", flush=True)
            continue
        cells = [f"{med[a] / med[b]:.2f}" for _, a, b in RATIOS]
        print(f"| {','.join(map(str, shape))} | " + " | ".join(cells)
              + f" | {med['bn'] * 1e6:.0f} | {med['sn'] * 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
