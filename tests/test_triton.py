"""Triton kernels (normkit.kernels.triton) on CPU, under Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when it decorates a kernel, so the checks in
``_triton_check.py`` run once, in a fresh interpreter started with ``TRITON_INTERPRET=1``;
each one is reported here as its own test. The pytest process itself never imports the
kernels in interpreter mode, so other tests see an unchanged environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'normkit[triton]')")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load_helper():
    spec = importlib.util.spec_from_file_location("_triton_check", HERE / "_triton_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helper = _load_helper()


@pytest.fixture(scope="module")
def results() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NORMKIT_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, str(HERE / "_triton_check.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(helper.RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        pytest.fail(f"the Triton check process failed (exit {done.returncode}):\n{output}")
    return json.loads(lines[-1][len(helper.RESULT_PREFIX):])


@pytest.mark.parametrize("name", list(helper.CHECKS))
def test_triton_kernels_under_interpreter(results, name):
    outcome = results.get(name, "not run")
    if outcome != "ok":
        pytest.fail(f"{name}:\n{outcome}", pytrace=False)


def test_helper_refuses_to_run_without_interpreter(capsys):
    """Without TRITON_INTERPRET=1 the kernels would be compiled for a GPU: the helper says so."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        assert helper.main([]) == 2
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_gpu_benchmark_exits_cleanly_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run for real")
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    assert "CUDA" in capsys.readouterr().out


def _signature(fn, x_type: str, stat_type: str, constants: dict) -> dict:
    """Triton signature of a kernel: x-sized pointers in ``x_type``, statistics in ``stat_type``."""
    x_pointers = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
    sig = {}
    for name in fn.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{x_type if name in x_pointers else stat_type}"
        else:
            sig[name] = "i32"
    return sig


def test_kernels_compile_for_hopper_without_gpu():
    """The interpreter does not type-check like the compiler: build every kernel down to a
    cubin for sm_90 (H100), as a GPU launch would, in both layouts' specialisations."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip(f"triton {triton.__version__} has no ahead-of-time compile API")
    from normkit.kernels import triton as T

    if T.INTERPRET:
        pytest.skip("normkit.kernels.triton was imported in interpreter mode in this process")
    first = {"STRIDE_RED": 1, "BLOCK_K": 2, "BLOCK_R": 1024}  # channels-first specialisation
    last = {"STRIDE_KEEP": 1, "BLOCK_K": 64, "BLOCK_R": 32}  # channels-last specialisation
    cases = [  # each kernel once, both layouts and a half type among them (a cold compile is ~1 s)
        (T._moments_kernel, "fp32", "fp32", first, 4),
        (T._moments_kernel, "bf16", "fp32", last, 4),
        (T._merge_kernel, "fp32", "fp32", {"BLOCK": 1024}, 4),
        (T._reduce_kernel, "fp16", "fp32", last, 4),
        (T._apply_kernel, "bf16", "fp32", {"CHANNELS_LAST": False, "BLOCK_ROWS": 16, "BLOCK_COLS": 256}, 8),
        (T._backward_apply_kernel, "fp32", "fp32", {"CHANNELS_LAST": True, "BLOCK_ROWS": 16, "BLOCK_COLS": 256}, 8),
    ]
    for kernel, x_type, stat_type, constants, warps in cases:
        source = ASTSource(kernel, _signature(kernel, x_type, stat_type, constants), constants)
        options = {"num_warps": warps, "enable_fp_fusion": True}
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert "ld.global" in compiled.asm["ptx"], (kernel, constants)
