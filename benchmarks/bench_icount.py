"""Instructions per call of normkit's layers and of torch.nn's, counted by valgrind's callgrind:
a measure of the fixed per-call cost that other jobs on the machine cannot disturb (wall-clock
ratios on a shared 2-core machine swing by 2x and more under load; instruction counts repeat
to within 0.1%). Instructions are not time (torch's kernels retire more per cycle than the
Python interpreter does), so use it to compare two versions of the same code path, and the
wall-clock benchmarks (``bench_small_ab.py``) for ratios to torch.

    python benchmarks/bench_icount.py                  # this checkout
    python benchmarks/bench_icount.py --root /other    # another normkit source tree (A/B)

Needs ``valgrind`` and a C compiler (for the four-line helper that switches counting on and
off around the timed calls). 1 thread; each case runs 5 warm-up calls, then 10 counted ones;
shape (2, 64, 7, 7) unless ``--shape``; ``--only BatchRenorm2d,BatchNorm2d`` limits the layers. Takes 2-4 minutes (Python under valgrind). Cases: the
layers (training forward+backward, training forward, no-grad eval forward), and a normkit BN
training forward cut at each layer of the call, as in ``bench_op_overhead.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tempfile

HELPER = r"""
#include <valgrind/callgrind.h>
void nk_count_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void nk_count_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""
COUNTED = 10


def _cases(torch, normkit, shape, only=()):
    from normkit import functional as F
    from normkit._core import MixSpec
    from normkit.kernels import cpu, ops

    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    cases = {}
    layers = {"nn.BatchNorm2d": torch.nn.BatchNorm2d(c), "nn.GroupNorm(8)": torch.nn.GroupNorm(8, c),
              "normkit SwitchNorm2d": normkit.SwitchNorm2d(c), "normkit BatchNorm2d": normkit.BatchNorm2d(c),
              "normkit GroupNorm(8)": normkit.GroupNorm(8, c),
              "normkit BatchRenorm2d": normkit.BatchRenorm2d(c, warmup=(0, 0, 0)),
              "normkit SparseSwitchNorm2d": normkit.SparseSwitchNorm2d(c, radius=0.45, radius_steps=None)}
    if only:
        layers = {name: m for name, m in layers.items() if any(word in name for word in only)}
    for name, m in layers.items():
        cases[f"{name} fwd+bwd"] = (m, True, (lambda m: lambda: m(x).sum().backward())(m))
        cases[f"{name} fwd"] = (m, True, (lambda m: lambda: m(x))(m))
        cases[f"{name} eval"] = (m, False, (lambda m: lambda: m(x))(m))
    bn = normkit.BatchNorm2d(c)
    spec = MixSpec(("bn",), bn.eps)
    w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
    plain = (x.detach(), w.detach(), b.detach(), None, None, None, None, (2,), (1,), 0, bn.eps, 1)
    parts = {
        "BN fwd: C call (cpu.layer_forward)": lambda: cpu.layer_forward(*plain),
        "BN fwd: + validation (operator kernel)": lambda: ops._layer_forward_cpu(*plain),
        "BN fwd: + autograd node, running update": lambda: ops.layer_norm_op(x, spec, w, b, None, None, rm, rv, 0.1,
                                                                               1),
        "BN fwd: + checks, routing (F.run)": lambda: F.run(x, spec, w, b, None, None, rm, rv, 0.1, 1),
        "BN fwd: + module (BatchNorm2d)": lambda: bn(x),
        "x.sum().backward() alone": lambda: x.sum().backward(),
    }
    if not only:
        for name, fn in parts.items():
            cases[name] = (bn, True, fn)
    return cases


def _child(root: str, helper: str, shape, only) -> None:
    """Runs under valgrind: count each case, one callgrind dump per case, in order."""
    sys.path.insert(0, root)
    import torch

    import normkit

    torch.set_num_threads(1)
    lib = ctypes.CDLL(helper)
    for name, (module, training, fn) in _cases(torch, normkit, shape, only).items():
        module.train(training)
        with torch.set_grad_enabled(training):
            for _ in range(5):
                fn()
            lib.nk_count_start()
            for _ in range(COUNTED):
                fn()
            lib.nk_count_stop()
        print("CASE", name, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="a normkit source tree to import instead of this checkout")
    parser.add_argument("--shape", default="2,64,7,7", help="N,C,H,W")
    parser.add_argument("--only", default="", help="comma-separated words: only the layers whose name has one "
                        "(e.g. BatchNorm2d,BatchRenorm2d), without the cut of the BN call")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root) if args.root else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.child:
        _child(root, args.child, shape, tuple(w for w in args.only.split(",") if w))
        return 0
    if shutil.which("valgrind") is None:
        print("bench_icount needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nk-icount-") as tmp:
        helper = os.path.join(tmp, "libcount.so")
        src = os.path.join(tmp, "count.c")
        with open(src, "w") as f:
            f.write(HELPER)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", src, "-o", helper], check=True)
        out = os.path.join(tmp, "cg.out")
        # valgrind cannot decode AVX-512: torch's kernels are held to AVX2 under it (a
        # native normkit build on an AVX-512 machine still needs the rebuild the error names)
        env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", **os.environ}
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
             os.path.abspath(__file__), "--root", root, "--shape", args.shape, "--only", args.only, "--child",
             helper],
            capture_output=True, text=True, env=env)
        names = [line[5:] for line in done.stdout.splitlines() if line.startswith("CASE ")]
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        counts = []
        for path in dumps:
            with open(path) as f:
                counts += [int(line.split()[1]) for line in f if line.startswith("totals:")]
        if done.returncode != 0 or len(counts) != len(names):
            print(done.stderr[-3000:], file=sys.stderr)
            if "SIGILL" in done.stderr:
                print("valgrind met an instruction it cannot decode (AVX-512 in a native build): rebuild the "
                      "kernels with NORMKIT_NATIVE=0 CFLAGS=-march=x86-64-v3 python -m normkit.kernels._build, "
                      "count, then rebuild them as usual", file=sys.stderr)
            return 1
    print(f"normkit from {root}; shape {shape}; 1 thread; thousands of instructions per call (callgrind)")
    for name, count in zip(names, counts):
        print(f"{name:44s} {count / COUNTED / 1000:8.1f}k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
