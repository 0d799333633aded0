"""Speed of normkit.keras.SwitchNormalization against keras.layers.BatchNormalization on JAX under jit.

For each NHWC shape, times the training-mode forward and forward+backward (gradients with
respect to the input and every trainable weight, the moving-statistics update included) of
both layers, each compiled once with ``jax.jit`` around ``layer.stateless_call``. Reported:
the **median** of the repetitions, taken round-robin in a fresh random order each time (so
load changes on the machine hit both layers alike), and SN's time as a ratio to BN's from
the same run.

Usage::

    python benchmarks/bench_keras.py            # 25 repetitions per variant
    python benchmarks/bench_keras.py --quick    # 5 repetitions
    python benchmarks/bench_keras.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    sys.exit(f"bench_keras.py times the JAX backend; unset KERAS_BACKEND (it is {os.environ['KERAS_BACKEND']!r})")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from normkit.keras import SwitchNormalization  # noqa: E402

SHAPES = [(32, 64, 32, 32), (8, 256, 14, 14), (2, 64, 56, 56), (128, 128, 8, 8), (4, 512, 7, 7)]  # N, C, H, W


def _compiled(layer, x, dy):
    """``(forward, forward_backward)`` jitted functions of the layer's state and the input."""
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(tv, ntv, inputs):
        y, new_ntv = layer.stateless_call(tv, ntv, inputs, training=True)
        return y, new_ntv

    def loss(tv, ntv, inputs):
        y, new_ntv = forward(tv, ntv, inputs)
        return jnp.sum(y * dy), new_ntv

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
    return (lambda: fwd(trainable, non_trainable, x)), (lambda: fwd_bwd(trainable, non_trainable, x))


def _time(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def run(reps, shapes, seed=0):
    rng = np.random.default_rng(seed)
    order = random.Random(seed)
    rows = []
    for n, c, h, w in shapes:
        x = jnp.asarray(rng.standard_normal((n, h, w, c), dtype=np.float32))
        dy = jnp.asarray(rng.standard_normal((n, h, w, c), dtype=np.float32))
        variants = {}
        for name, layer in (("SN", SwitchNormalization()), ("BN", keras.layers.BatchNormalization())):
            fwd, fwd_bwd = _compiled(layer, x, dy)
            variants[(name, "fwd")] = fwd
            variants[(name, "fwd+bwd")] = fwd_bwd
        for fn in variants.values():  # compile and warm up
            _time(fn)
            _time(fn)
        times = {key: [] for key in variants}
        for _ in range(reps):
            keys = list(variants)
            order.shuffle(keys)
            for key in keys:
                times[key].append(_time(variants[key]))
        median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
        rows.append({
            "shape_nhwc": [n, h, w, c],
            **{f"{name} {kind} ms": round(median[(name, kind)], 4) for name, kind in median},
            "ratio fwd": round(median[("SN", "fwd")] / median[("BN", "fwd")], 3),
            "ratio fwd+bwd": round(median[("SN", "fwd+bwd")] / median[("BN", "fwd+bwd")], 3),
        })
        print(_format_row(rows[-1]), flush=True)
    return rows


def _format_row(row):
    n, h, w, c = row["shape_nhwc"]
    return (
        f"{n}x{h}x{w}x{c:<5} | {row['SN fwd ms']:9.3f} {row['BN fwd ms']:9.3f} {row['ratio fwd']:6.2f}x | "
        f"{row['SN fwd+bwd ms']:9.3f} {row['BN fwd+bwd ms']:9.3f} {row['ratio fwd+bwd']:6.2f}x"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repetitions instead of 25")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per variant")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the setup here")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 25)
    print(f"JAX {jax.__version__} ({jax.default_backend()}), Keras {keras.__version__}, {os.cpu_count()} CPUs, "
          f"median of {reps} shuffled repetitions, training mode, float32, NHWC")
    print(f"{'N x H x W x C':<15} | {'SN fwd ms':>9} {'BN fwd ms':>9} {'ratio':>7} | {'SN f+b ms':>9} {'BN f+b ms':>9} {'ratio':>7}")
    rows = run(reps, SHAPES)
    if args.json:
        setup = {"jax": jax.__version__, "keras": keras.__version__, "cpus": os.cpu_count(),
                 "machine": platform.machine(), "reps": reps}
        args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
