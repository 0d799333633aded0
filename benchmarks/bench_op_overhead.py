"""Per-call overhead of the ways to attach a fused kernel to torch, on a small input.

Each candidate wraps the same do-nothing "kernel" (``torch.empty_like``), so what is timed
is the registration's own cost, forward and forward+backward:

* ``autograd.Function``: a Python autograd.Function calling the kernel directly (what
  normkit did before its kernels became operators; invisible to FakeTensor and compile).
* ``Library + Python autograd``: ``torch.library.Library`` schema, CPU and fake kernels, an
  ``Autograd`` kernel that is an autograd.Function (normkit's choice).
* ``custom_op``: ``torch.library.custom_op`` with ``register_fake`` and ``register_autograd``.
* ``C++ TORCH_LIBRARY``: schema, CPU kernel and autograd in C++ (``--cpp``: compiled here
  with the torch headers first, about 20 s).

Then the real layers on the same input: normkit's SN / BN / GN against torch.nn's BN / GN,
and where a normkit BN training forward spends its time, one layer of the call at a time
(the C call alone, the validating operator kernel, the operator call with its autograd node
and running update, the functional op, the module), plus the two float64 softmaxes that SN
adds (forward+backward). Times are medians over shuffled repetitions, 1 thread, in
microseconds.

    python benchmarks/bench_op_overhead.py [--cpp] [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import Tensor, nn

import normkit

SHAPE = (2, 64, 7, 7)


def _kernel(x: Tensor, w: Tensor) -> Tensor:
    return torch.empty_like(x)


class _Direct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _kernel(x, w)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g), torch.empty(SHAPE[1])


@torch.library.custom_op("nkbench::custom_fwd", mutates_args=())
def _custom_fwd(x: Tensor, w: Tensor) -> Tensor:
    return _kernel(x, w)


@_custom_fwd.register_fake
def _(x, w):
    return torch.empty_like(x)


def _custom_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _custom_bwd(ctx, g):
    return torch.empty_like(g), torch.empty(SHAPE[1])


_custom_fwd.register_autograd(_custom_bwd, setup_context=_custom_setup)

_lib = torch.library.Library("nkbench", "DEF")
_lib.define("lib_fwd(Tensor x, Tensor w) -> Tensor")
_lib.impl("lib_fwd", _kernel, "CPU")
torch.library.register_fake("nkbench::lib_fwd", lambda x, w: torch.empty_like(x), lib=_lib)


class _LibAutograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.nkbench.lib_fwd(x, w)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g), torch.empty(SHAPE[1])


_lib.impl("lib_fwd", lambda x, w: _LibAutograd.apply(x, w), "Autograd")

CPP_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
using torch::autograd::AutogradContext; using torch::autograd::variable_list;
at::Tensor fwd_cpu(const at::Tensor& x, const at::Tensor& w) { return at::empty_like(x); }
struct Fn : public torch::autograd::Function<Fn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("nkbench_cpp::fwd", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    ctx->save_for_backward({x, w});
    return op.call(x, w);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {at::empty_like(g[0]), at::empty({w_size})};
  }
  static constexpr int64_t w_size = 64;
};
at::Tensor fwd_autograd(const at::Tensor& x, const at::Tensor& w) { return Fn::apply(x, w); }
TORCH_LIBRARY(nkbench_cpp, m) { m.def("fwd(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(nkbench_cpp, CPU, m) { m.impl("fwd", fwd_cpu); }
TORCH_LIBRARY_IMPL(nkbench_cpp, Autograd, m) { m.impl("fwd", fwd_autograd); }
"""


def _build_cpp() -> bool:
    from torch.utils import cpp_extension

    out = os.path.join(tempfile.mkdtemp(prefix="nkbench-"), "op.so")
    src = out.replace(".so", ".cpp")
    with open(src, "w") as f:
        f.write(CPP_SOURCE)
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-w", src, "-o", out, f"-L{lib_dir}", "-lc10",
           "-ltorch_cpu", "-ltorch"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    if subprocess.run(cmd, capture_output=True, timeout=300).returncode != 0:
        return False
    torch.ops.load_library(out)
    return True


def _bn_forward_parts(x: Tensor) -> dict:
    """One normkit BN training forward, cut at each layer of the call (private APIs)."""
    from normkit import functional as F
    from normkit._core import MixSpec
    from normkit.kernels import cpu, ops

    bn = normkit.BatchNorm2d(x.shape[1])
    spec = MixSpec(("bn",), bn.eps)
    w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
    plain = (x.detach(), w.detach(), b.detach(), None, None, None, None, [2], [1], 0, bn.eps, 1)
    logits = torch.zeros(3, requires_grad=True)

    def softmaxes():
        wm = torch.softmax(logits, 0, dtype=torch.float64)
        wv = torch.softmax(logits, 0, dtype=torch.float64)
        (wm.sum() + wv.sum()).backward()

    return {
        ("BN fwd: C call (cpu.layer_forward)", "fwd"): lambda: cpu.layer_forward(*plain),
        ("BN fwd: + validation (operator kernel)", "fwd"): lambda: ops._layer_forward_cpu(*plain),
        ("BN fwd: + autograd node, running update", "fwd"): lambda: ops.layer_norm_op(x, spec, w, b, None, None, rm,
                                                                                        rv, 0.1, 1),
        ("BN fwd: + checks, routing (F.run)", "fwd"): lambda: F.run(x, spec, w, b, None, None, rm, rv, 0.1, 1),
        ("BN fwd: + module (BatchNorm2d)", "fwd"): lambda: bn(x),
        ("SN weights: two float64 softmaxes", "fwd+bwd"): softmaxes,
    }


def _time(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpp", action="store_true", help="also build and time a C++ TORCH_LIBRARY candidate")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--number", type=int, default=400, help="calls per repetition")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(SHAPE, requires_grad=True)
    w = torch.ones(SHAPE[1], requires_grad=True)
    c = SHAPE[1]
    layers = {
        "nn.BatchNorm2d": nn.BatchNorm2d(c), "nn.GroupNorm(8)": nn.GroupNorm(8, c),
        "normkit SwitchNorm2d": normkit.SwitchNorm2d(c), "normkit BatchNorm2d": normkit.BatchNorm2d(c),
        "normkit GroupNorm(8)": normkit.GroupNorm(8, c),
    }
    candidates = {
        "autograd.Function": lambda: _Direct.apply(x, w),
        "Library + Python autograd": lambda: torch.ops.nkbench.lib_fwd(x, w),
        "custom_op": lambda: torch.ops.nkbench.custom_fwd(x, w),
    }
    if args.cpp and _build_cpp():
        candidates["C++ TORCH_LIBRARY"] = lambda: torch.ops.nkbench_cpp.fwd(x, w)
    cases = {}
    for name, fn in candidates.items():
        cases[(name, "fwd")] = fn
        cases[(name, "fwd+bwd")] = (lambda f: lambda: f().sum().backward())(fn)
    for name, layer in layers.items():
        cases[(name, "fwd")] = (lambda m: lambda: m(x))(layer)
        cases[(name, "fwd+bwd")] = (lambda m: lambda: m(x).sum().backward())(layer)
    cases[("x.sum().backward() alone", "fwd+bwd")] = lambda: x.sum().backward()
    cases.update(_bn_forward_parts(x))
    for fn in cases.values():
        _time(fn, 50)
    samples: dict = {key: [] for key in cases}
    keys = list(cases)
    for _ in range(args.reps):
        random.shuffle(keys)
        for key in keys:
            samples[key].append(_time(cases[key], args.number))
    print(f"input {SHAPE}, float32, 1 thread, median of {args.reps} shuffled repetitions x {args.number} calls")
    print(f"{'candidate':42s} {'fwd us':>9s} {'fwd+bwd us':>11s}")
    names = list(dict.fromkeys(k[0] for k in cases))
    for name in names:
        fwd = samples.get((name, "fwd"))
        both = samples.get((name, "fwd+bwd"))
        fwd_text = f"{statistics.median(fwd):9.1f}" if fwd else f"{'':9s}"
        both_text = f"{statistics.median(both):11.1f}" if both else ""
        print(f"{name:42s} {fwd_text} {both_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
