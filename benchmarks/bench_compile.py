"""``torch.compile`` with normkit's layers: compile time of a ResNet-18 and its steady-state step.

For each normalizer (``nn.BatchNorm2d``, normkit ``BatchNorm2d``, ``SwitchNorm2d``) a fresh
process builds a ResNet-18 (torchvision's layout, written here: torchvision does not import
beside the CPU wheel), compiles it (default Inductor backend, training mode) with an empty
Inductor cache, and measures:

* ``compile s``: wall time of the first training step (forward, loss, backward), which
  includes tracing, AOT autograd and Inductor's code generation;
* ``compiled ms`` / ``eager ms``: the median training step after warm-up, compiled and eager;
* ``fused ops``: the ``normkit::layer_forward`` nodes in the captured graphs (each normkit
  layer must stay one fused operator under compile, never fall back to traced reference maths).

    python benchmarks/bench_compile.py            # batch 8 at 64x64, 10 timed steps
    python benchmarks/bench_compile.py --quick    # batch 2 at 32x32, 3 timed steps

Compile times depend on the machine's load far more than step times do; read them as ratios
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

NORMS = ("nn.BatchNorm2d", "normkit BatchNorm2d", "normkit SwitchNorm2d")


def _resnet18(norm):
    import torch.nn as nn

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = norm(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = norm(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def _child(norm_name: str, batch: int, size: int, steps: int) -> dict:
    import torch

    import normkit

    torch.set_num_threads(int(os.environ.get("NK_BENCH_THREADS", "1")))
    norm = {"nn.BatchNorm2d": torch.nn.BatchNorm2d, "normkit BatchNorm2d": normkit.BatchNorm2d,
            "normkit SwitchNorm2d": normkit.SwitchNorm2d}[norm_name]
    torch.manual_seed(0)
    model = _resnet18(norm).train()
    x, target = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    fused = []

    def counting_backend(gm, inputs):
        fused.extend(1 for n in gm.graph.nodes if n.op == "call_function" and "normkit.layer_forward" in str(n.target))
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs)

    compiled = torch.compile(model, backend=counting_backend)

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(fn(x), target).backward()

    start = time.perf_counter()
    step(compiled)
    compile_s = time.perf_counter() - start
    times = {"compiled": [], "eager": []}
    for fn in (compiled, model):
        step(fn)
    for _ in range(steps):
        for name, fn in (("compiled", compiled), ("eager", model)):
            start = time.perf_counter()
            step(fn)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {"compile_s": compile_s, "fused": len(fused), **{k: statistics.median(v) for k, v in times.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 at 32x32, 3 timed steps")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    batch = args.batch or (2 if args.quick else 8)
    size = args.size or (32 if args.quick else 64)
    steps = args.steps or (3 if args.quick else 10)
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, batch, size, steps)))
        return 0
    rows = {}
    for name in NORMS:
        with tempfile.TemporaryDirectory(prefix="nk-inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--batch", str(batch),
                                   "--size", str(size), "--steps", str(steps)], capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        rows[name] = json.loads(lines[0][7:])
    base = rows["nn.BatchNorm2d"]
    print(f"ResNet-18, batch {batch} at {size}x{size}, training step, 1 thread; fresh process and Inductor cache each")
    print("| norm | compile s | / nn.BN | compiled ms | eager ms | compiled / eager | fused ops |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['compile_s']:.1f} | {r['compile_s'] / base['compile_s']:.2f} | {r['compiled']:.1f} "
              f"| {r['eager']:.1f} | {r['compiled'] / r['eager']:.2f} | {r['fused']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
