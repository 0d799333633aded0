"""normkit's fused layer as torch operators: opcheck, FakeTensor, meta, compile, export,
argument validation, and the backend switch (threads, environment, status)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import normkit
from common_layers import CASES, LAYER_NORM_CASES
from normkit import functional as F
from normkit import kernels

CPU = kernels.load("cpu")
needs_cpu_kernels = pytest.mark.skipif(CPU is None, reason="the CPU kernel library was not built")
OPS = (torch.ops.normkit.layer_forward.default, torch.ops.normkit.layer_backward.default,
       torch.ops.normkit.update_running_.default)


def _op_args(kinds, groups, mask, shape=(3, 4, 5, 2), fmt=torch.contiguous_format, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    c, k = shape[1], len(kinds)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.rand(c, dtype=sd) + 0.5, torch.randn(c, dtype=sd)
    w.requires_grad_(), b.requires_grad_()
    wm = torch.softmax(torch.randn(k, dtype=torch.float64), 0).requires_grad_() if k > 1 else None
    wv = torch.softmax(torch.randn(k, dtype=torch.float64), 0).requires_grad_() if k > 1 else None
    rm = torch.randn(c, dtype=sd) if mask else None
    rv = torch.rand(c, dtype=sd) + 0.5 if mask else None
    return (x, w, b, wm, wv, rm, rv, kinds, groups, mask, 1e-5, 1)


OP_SAMPLES = {
    "sn-train": ([0, 1, 2], [1, 1, 1], 0),
    "sn-eval": ([0, 1, 2], [1, 1, 1], 4),
    "sn-gn": ([0, 3, 2], [1, 2, 1], 0),
    "bn": ([2], [1], 0),
    "bn-eval": ([2], [1], 1),
    "gn": ([3], [2], 0),
    "in-eval": ([0], [1], 1),
}


@needs_cpu_kernels
@pytest.mark.parametrize("name", list(OP_SAMPLES))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_opcheck_layer_forward(name, fmt):
    args = _op_args(*OP_SAMPLES[name], fmt=fmt)
    torch.library.opcheck(torch.ops.normkit.layer_forward.default, args)


@needs_cpu_kernels
def test_opcheck_layer_backward_and_update_running():
    x, w, b, wm, wv, rm, rv, kinds, groups, mask, eps, axis = _op_args([0, 1, 2], [1, 1, 1], 0)
    with torch.no_grad():
        y, stats = torch.ops.normkit.layer_forward(x, w, b, wm, wv, rm, rv, kinds, groups, mask, eps, axis)
    dy = torch.randn_like(y)
    for output_mask in ([True] * 5, [True, False, True, False, True]):
        torch.library.opcheck(torch.ops.normkit.layer_backward.default,
                              (dy, x.detach(), stats, w.detach(), wm.detach(), wv.detach(), None, None, kinds, groups,
                               mask, eps, axis, output_mask))
    n, c = x.shape[:2]
    for track in (1,):
        torch.library.opcheck(torch.ops.normkit.update_running_.default,
                              (torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64), stats, n, c,
                               x.numel() // (n * c), track, 0.1))


def _logit_args(kinds, groups, mask, dtype=torch.float64, fmt=torch.contiguous_format):
    """The operator's arguments with logits of the statistics dtype and ``softmax=True``."""
    args = list(_op_args(kinds, groups, mask, dtype=dtype, fmt=fmt))
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    args[3], args[4] = (torch.randn(len(kinds), dtype=sd).requires_grad_() for _ in range(2))
    return (*args, None, True)


@needs_cpu_kernels
@pytest.mark.parametrize("name", ["sn-train", "sn-eval", "sn-gn"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_opcheck_layer_forward_with_logits(name, fmt):
    torch.library.opcheck(torch.ops.normkit.layer_forward.default, _logit_args(*OP_SAMPLES[name], fmt=fmt))


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["sn-train", "sn-eval", "sn-gn"])
def test_softmax_flag_equals_the_weights_of_the_logits(name, dtype):
    """softmax=True with logits gives what the float64 softmax weights give, and the logits'
    gradients are the weights' gradients through the softmax (float64 weights: to the ulp)."""
    x, w, b, ml, vl, rm, rv, kinds, groups, mask, eps, axis, _, _ = _logit_args(*OP_SAMPLES[name], dtype=dtype)
    wm, wv = torch.softmax(ml, 0, dtype=torch.float64), torch.softmax(vl, 0, dtype=torch.float64)
    y_logits, stats_logits = torch.ops.normkit.layer_forward(x, w, b, ml, vl, rm, rv, kinds, groups, mask, eps, axis,
                                                             None, True)
    y_weights, stats_weights = torch.ops.normkit.layer_forward(x, w, b, wm, wv, rm, rv, kinds, groups, mask, eps,
                                                               axis)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(y_logits, y_weights, **tol)
    dy = torch.randn_like(y_logits)
    g_logits = torch.autograd.grad(y_logits, (x, w, b, ml, vl), dy)
    g_weights = torch.autograd.grad(y_weights, (x, w, b, ml, vl), dy)
    for got, want in zip(g_logits, g_weights):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)
    if dtype == torch.float64:  # and twice differentiable, through the reference maths
        small = [t.detach().requires_grad_() for t in (x, w, b, ml, vl)]
        torch.autograd.gradgradcheck(
            lambda *t: torch.ops.normkit.layer_forward(*t, rm, rv, kinds, groups, mask, eps, axis, None, True)[0],
            small)


@needs_cpu_kernels
def test_opcheck_layer_backward_with_logits():
    x, w, b, ml, vl, rm, rv, kinds, groups, mask, eps, axis, _, _ = _logit_args([0, 1, 2], [1, 1, 1], 0)
    with torch.no_grad():
        y, stats = torch.ops.normkit.layer_forward(x, w, b, ml, vl, rm, rv, kinds, groups, mask, eps, axis, None, True)
    for output_mask in ([True] * 5, [False, False, False, True, True]):
        torch.library.opcheck(torch.ops.normkit.layer_backward.default,
                              (torch.randn_like(y), x.detach(), stats, w.detach(), ml.detach(), vl.detach(), None,
                               None, kinds, groups, mask, eps, axis, output_mask, None, True))


@needs_cpu_kernels
def test_softmax_flag_is_validated():
    x, w, b, ml, vl, rm, rv, kinds, groups, mask, eps, axis, _, _ = [
        t.detach() if isinstance(t, torch.Tensor) else t for t in _logit_args([0, 1, 2], [1, 1, 1], 0,
                                                                            dtype=torch.float32)]
    op = torch.ops.normkit.layer_forward
    with pytest.raises(ValueError, match=r"softmax mixes two or more sources' logits, got 1 source kind\(s\) \[2\]"):
        op(x, w, b, None, None, rm, rv, [2], [1], 0, eps, axis, None, True)
    with pytest.raises(ValueError, match="mean_weights must be a contiguous CPU torch.float32 tensor"):
        op(x, w, b, ml.double(), vl, rm, rv, kinds, groups, mask, eps, axis, None, True)  # logits: stats dtype
    with pytest.raises(ValueError, match="mean_weights must be a contiguous CPU torch.float64 tensor"):
        op(x, w, b, ml, vl, rm, rv, kinds, groups, mask, eps, axis)  # weights: float64


@needs_cpu_kernels
def test_update_running_matches_python_update():
    bn = normkit.BatchNorm2d(4).double()
    ref = normkit.BatchNorm2d(4).double()
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64) * 3 + 1
    bn(x)
    with normkit.use_backend("reference"):
        ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES + LAYER_NORM_CASES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_fake_tensor_forward(case, training):
    with FakeTensorMode():
        m = case.make().train(training)
        x = torch.randn(case.shape)
        y = m(x)
        y.sum().backward()
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("case", CASES + LAYER_NORM_CASES, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_meta_device_forward(case, training):
    with torch.device("meta"):
        m = case.make().train(training)
        x = torch.randn(case.shape)
    y = m(x)
    assert y.device.type == "meta" and y.shape == x.shape


class _GraphCapture:
    def __init__(self):
        self.graphs: list[str] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(str(gm.graph))
        return gm.forward


@needs_cpu_kernels
@pytest.mark.parametrize("make", [lambda: normkit.SwitchNorm2d(4), lambda: normkit.BatchNorm2d(4),
                                  lambda: normkit.GroupNorm(2, 4)], ids=["sn", "bn", "gn"])
def test_compile_keeps_the_fused_operator(make):
    torch._dynamo.reset()
    capture = _GraphCapture()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), make())
    compiled = torch.compile(model, backend=capture, fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    with normkit.use_backend("auto"):
        y = compiled(x)
        torch.testing.assert_close(y, model(x))
    assert any("normkit.layer_forward" in g for g in capture.graphs), capture.graphs
    # SN's softmax is part of the operator call (softmax=True), not two ops before it
    assert not any("softmax" in g for g in capture.graphs), capture.graphs


@needs_cpu_kernels
def test_compile_inductor_trains_with_the_operator():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), normkit.SwitchNorm2d(4))
    twin = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), normkit.SwitchNorm2d(4))
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    compiled(x).square().sum().backward()
    with normkit.use_backend("reference"):
        twin(x).square().sum().backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)


@needs_cpu_kernels
def test_export_has_the_operator_and_runs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), normkit.SwitchNorm2d(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,))
    assert "normkit.layer_forward" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), model(x))


# ---- validation: hostile arguments raise, never crash ------------------------------------------

BAD_VECTORS = [
    (torch.ones(1), r"should contain 4 elements not 1"),
    (torch.ones(1024), r"should contain 4 elements not 1024"),
    (torch.ones(2, 2), r"expected shape \(4,\)"),
    (torch.ones(4, dtype=torch.int64), r"must be a floating-point tensor"),
    (torch.ones(4, dtype=torch.complex64), r"must be a floating-point tensor"),
]


@pytest.mark.parametrize("backend", ["reference", "aten", "auto"])
@pytest.mark.parametrize("bad,message", BAD_VECTORS, ids=["1", "1024", "2x2", "int64", "complex"])
@pytest.mark.parametrize("slot", ["running_mean", "running_var", "weight", "bias"])
def test_functional_batch_norm_rejects_bad_vectors(backend, bad, message, slot):
    args = {"running_mean": torch.zeros(4), "running_var": torch.ones(4), "weight": torch.ones(4),
            "bias": torch.zeros(4)}
    args[slot] = bad
    x = torch.randn(3, 4, 5, 5)
    with normkit.use_backend(backend):
        for training in (True, False):
            with pytest.raises(ValueError, match=rf"{slot} {message}" if "elements" in message else message):
                F.batch_norm(x, args["running_mean"], args["running_var"], args["weight"], args["bias"], training)


@pytest.mark.parametrize("backend", ["reference", "aten", "auto"])
@pytest.mark.parametrize("attr", ["weight", "bias", "running_mean", "running_var", "mean_logits", "var_logits"])
def test_module_with_replaced_tensors_raises(backend, attr):
    for size in (1, 1024):
        m = normkit.SwitchNorm2d(4)
        with torch.no_grad():
            if attr in ("weight", "bias", "mean_logits", "var_logits"):
                setattr(m, attr, nn.Parameter(torch.ones(size)))
            else:
                setattr(m, attr, torch.ones(size))
        with normkit.use_backend(backend):
            for training in (True, False):
                m.train(training)
                if attr.startswith("running") and training:
                    continue  # batch statistics: running buffers are only written, checked below
                with pytest.raises(ValueError, match=rf"{attr} (should contain|must have shape)"):
                    m(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_training_writes_only_to_valid_running_buffers(backend):
    m = normkit.BatchNorm2d(4)
    m.running_mean = torch.zeros(1)
    with normkit.use_backend(backend), pytest.raises(ValueError, match="running_mean should contain 4 elements not 1"):
        m(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.int8])
def test_functional_ops_reject_non_float_inputs(dtype):
    x = torch.ones(2, 3, 4, dtype=dtype)
    message = r"x must be float16, bfloat16, float32 or float64, got dtype"
    for call in (lambda: F.batch_norm(x, None, None, training=True), lambda: F.group_norm(x, 3),
                 lambda: F.instance_norm(x), lambda: F.layer_norm(x, (4,)),
                 lambda: F.switch_norm(x, None, None, None, None, torch.zeros(3), torch.zeros(3), training=True)):
        with pytest.raises(ValueError, match=message):
            call()


@needs_cpu_kernels
def test_operators_validate_every_tensor():
    base = list(_op_args([0, 1, 2], [1, 1, 1], 4, dtype=torch.float32))
    base = [t.detach() if isinstance(t, torch.Tensor) else t for t in base]
    op = torch.ops.normkit.layer_forward
    bad = {
        0: [torch.ones(3, 4, 5, 2, dtype=torch.int64), torch.randn(3, 4, 5, 2)[:, :, ::2]],
        1: [torch.ones(1), torch.ones(4, dtype=torch.float64), torch.ones(8)[::2]],
        2: [torch.ones(1024)],
        3: [torch.ones(2, dtype=torch.float64), torch.ones(3)],
        4: [None, torch.ones(5, dtype=torch.float64)],
        5: [None, torch.ones(2)],
        6: [torch.ones(4, dtype=torch.float64)],
        7: [[0, 1, 7], [0, 1], [], list(range(20))],
        8: [[1, 1, 3], [1]],
        9: [2, 1 << 3, -1],
        10: [0.0, -1.0, float("nan")],
        11: [0, 4, -1],
    }
    for index, values in bad.items():
        for value in values:
            args = list(base)
            args[index] = value
            with pytest.raises((ValueError, RuntimeError, TypeError)):
                op(*args)
    x, w, *_ = base
    y, stats = op(*base)
    dy = torch.randn_like(y)
    back = [dy, x, stats, w, base[3], base[4], base[5], base[6], base[7], base[8], base[9], base[10], base[11],
            [True] * 5]
    for index, value in ((0, torch.ones(2, 2)), (2, stats[:-1]), (2, stats.double()), (13, [True] * 4)):
        args = list(back)
        args[index] = value
        with pytest.raises((ValueError, RuntimeError)):
            torch.ops.normkit.layer_backward(*args)
    with pytest.raises(ValueError, match="stats must be a contiguous CPU"):
        torch.ops.normkit.update_running_(torch.zeros(4), torch.ones(4), stats[:10], 3, 4, 10, 1, 0.1)
    with pytest.raises(ValueError, match="running_mean must be a contiguous CPU"):
        torch.ops.normkit.update_running_(torch.zeros(400), torch.ones(4), stats, 3, 4, 10, 1, 0.1)


@needs_cpu_kernels
def test_spec_checks_hold_after_a_valid_call_with_the_same_codes():
    op = torch.ops.normkit.layer_forward
    none = (None,) * 6
    op(torch.randn(2, 6, 3), *none, [3], [3], 0, 1e-5, 1)  # 3 groups divide 6 channels: checked once, remembered
    with pytest.raises(ValueError, match="group count 3 of a kind-3 source is invalid for 4 channels"):
        op(torch.randn(2, 4, 3), *none, [3], [3], 0, 1e-5, 1)
    with pytest.raises(ValueError, match=r"eps must be finite and > 0, got nan"):
        op(torch.randn(2, 6, 3), *none, [3], [3], 0, float("nan"), 1)


@needs_cpu_kernels
@pytest.mark.parametrize("name", ["sn-eval", "bn-eval", "in-eval", "gn"])
def test_stats_without_batch_statistics_are_zero_there(name):
    kinds, groups, mask = OP_SAMPLES[name]
    args = [t.detach() if isinstance(t, torch.Tensor) else t
            for t in _op_args(kinds, groups, mask, dtype=torch.float32)]
    n, c = args[0].shape[:2]
    for _ in range(3):  # a freed NaN buffer of the same size: the allocator tends to hand it back
        poison = torch.full((4 * n * c + 3 * c,), float("nan"))
        del poison
        y, stats = torch.ops.normkit.layer_forward(*args)
        assert torch.equal(stats[4 * n * c + c:], torch.zeros(2 * c))


@needs_cpu_kernels
def test_layer_backward_returns_empty_gradients_it_was_not_asked_for():
    args = [t.detach() if isinstance(t, torch.Tensor) else t for t in _op_args([0, 1, 2], [1, 1, 1], 0)]
    y, stats = torch.ops.normkit.layer_forward(*args)
    dy = torch.randn_like(y)
    x, w, _, wm, wv, rm, rv, kinds, groups, mask, eps, axis = args
    common = (dy, x, stats, w, wm, wv, rm, rv, kinds, groups, mask, eps, axis)
    full = torch.ops.normkit.layer_backward(*common, [True] * 5)
    some = torch.ops.normkit.layer_backward(*common, [False, True, False, True, False])
    for got, want, asked in zip(some, full, (False, True, False, True, False)):
        assert got.dtype == want.dtype
        if asked:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            assert got.numel() == 0


# ---- the backend switch ------------------------------------------------------------------------

def test_use_backend_is_per_thread():
    seen, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(name):
        try:
            with normkit.use_backend(name):
                barrier.wait()  # both blocks overlap here
                seen[name] = normkit.get_backend()
                barrier.wait()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    before = normkit.get_backend()
    threads = [threading.Thread(target=worker, args=(b,)) for b in ("reference", "aten")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and seen == {"reference": "reference", "aten": "aten"}
    assert normkit.get_backend() == before


def test_invalid_backend_names_are_errors_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'reference', 'aten', 'cpu', 'triton'"):
        normkit.set_backend("fast")
    env = dict(os.environ, NORMKIT_BACKEND="cuda")
    done = subprocess.run([sys.executable, "-c", "import normkit"], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "NORMKIT_BACKEND must be one of 'auto', 'reference', 'aten', 'cpu', 'triton', got 'cuda'" in done.stderr


def test_a_new_spec_type_never_takes_a_kernel_written_for_another():
    import dataclasses

    from normkit._core import MixSpec

    @dataclasses.dataclass(frozen=True)
    class DoubledScale(MixSpec):  # a normalizer added "the obvious way": a subclass with its own maths
        def mix(self, *args, **kwargs):
            mu, scale, shift, tracked = super().mix(*args, **kwargs)
            return mu, scale * 2, shift, tracked

    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for backend in ("reference", "aten", "auto"):
        with normkit.use_backend(backend):
            doubled = F.normalize(x, DoubledScale(("bn",), 1e-5))
            plain = F.normalize(x, MixSpec(("bn",), 1e-5))
        torch.testing.assert_close(doubled, 2 * plain)
    if CPU is not None:
        assert CPU.runs_layer(MixSpec(("bn",), 1e-5)) and not CPU.runs_layer(DoubledScale(("bn",), 1e-5))


@needs_cpu_kernels
def test_compile_with_a_mask_takes_the_reference_path():
    torch._dynamo.reset()
    capture = _GraphCapture()
    sn = normkit.SwitchNorm1d(4)
    x = torch.randn(3, 4, 6)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 1])[:, None]
    compiled = torch.compile(lambda x, mask: sn(x, mask), backend=capture, fullgraph=True)
    y = compiled(x, mask)
    with normkit.use_backend("reference"):
        torch.testing.assert_close(y, sn(x, mask))
    assert not any("normkit.layer_forward" in g for g in capture.graphs)  # no kernel takes masks
