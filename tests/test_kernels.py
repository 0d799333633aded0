"""The compiled CPU kernels (normkit/kernels/cpu.py, normkit/kernels/csrc/norm_kernels.c).

Each kernel is compared with the float64 reference (reference.py); whole layers (every
configuration of the layer table, common_layers.py) run with backend 'cpu' against backend
'reference' (outputs, every gradient, running statistics);
gradcheck goes through the C mixer's closed-form backward; and a library that cannot load
must leave normkit working on the reference path, saying why.
"""

from __future__ import annotations

import pytest
import torch

import normkit
import reference as ref
from common_layers import variant, variants
from normkit import kernels
from normkit.kernels._library import KernelUnavailable

pytest.importorskip("normkit.kernels.cpu", reason="the CPU kernel library was not built (no C compiler)")
KERNELS = kernels.load("cpu")
FUSED = "_LayerFunction"  # the autograd node of the normkit::layer_forward operator

# (shape, channel axis, memory format): NC* rows, channels_last 4-D/5-D, channels-last 3-D
LAYOUTS = [
    ((3, 5, 7, 11), 1, torch.contiguous_format),
    ((3, 5, 7, 11), 1, torch.channels_last),
    ((2, 3, 4, 5, 6), 1, torch.channels_last_3d),
    ((4, 13, 6), 2, torch.contiguous_format),
    ((1, 1, 1, 1), 1, torch.contiguous_format),  # N = C = L = 1
    ((5, 3, 1, 1), 1, torch.channels_last),  # L = 1
    ((1, 7, 17), 1, torch.contiguous_format),  # N = 1, primes
    ((6, 4), 1, torch.contiguous_format),  # (N, C): no positions
    ((2, 64, 300), 1, torch.contiguous_format),  # L > one accumulation block
    ((2, 300, 33), 1, torch.contiguous_format),
    ((2, 9, 9, 40), 3, torch.contiguous_format),  # channels-last with many positions
]


def _make(shape, fmt, dtype=torch.float32, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    return x.contiguous(memory_format=fmt)


def _bcast(stat, x, axis):
    shape = [1] * x.dim()
    shape[0], shape[axis] = stat.shape[0], stat.shape[-1]
    return stat.reshape(shape)


@pytest.mark.parametrize("shape,axis,fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_float64_reference(shape, axis, fmt, dtype):
    x = _make(shape, fmt, dtype, offset=3.0)
    assert KERNELS.supports(x, axis) is None
    n, c = shape[0], shape[axis]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    stat = torch.float64 if dtype == torch.float64 else torch.float32

    mean, var = KERNELS.moments(x, axis)
    ref_mean, ref_var = ref.moments(x, axis)
    assert mean.shape == (n, c) and mean.dtype == stat and var.dtype == stat
    torch.testing.assert_close(mean.double(), ref_mean, **tol)
    torch.testing.assert_close(var.double(), ref_var, **tol)

    g = torch.Generator().manual_seed(1)
    mu = torch.randn(n, c, generator=g, dtype=stat)
    scale = torch.randn(n, c, generator=g, dtype=stat)
    shift = torch.randn(c, generator=g, dtype=stat)
    y = KERNELS.apply(x, mu, scale, shift, axis)
    ref_y = (x.double() - _bcast(mu.double(), x, axis)) * _bcast(scale.double(), x, axis) + _bcast(
        shift.double()[None], x, axis
    )
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y.double(), ref_y, **tol)

    dy = _make(shape, fmt, dtype, seed=2)
    sum_dy, sum_dy_xc = KERNELS.reduce(dy, x, mean, axis)
    dims = [d for d in range(x.dim()) if d not in (0, axis)]
    xc = x.double() - _bcast(mean.double(), x, axis)
    ref_a = dy.double().sum(dims).reshape(n, c) if dims else dy.double()
    ref_b = (dy.double() * xc).sum(dims).reshape(n, c) if dims else dy.double() * xc
    torch.testing.assert_close(sum_dy.double(), ref_a, **tol)
    torch.testing.assert_close(sum_dy_xc.double(), ref_b, **tol)

    p = torch.randn(n, c, generator=g, dtype=stat)
    q = torch.randn(n, c, generator=g, dtype=stat)
    dx = KERNELS.backward_apply(dy, x, mean, scale, p, q, axis)
    ref_dx = dy.double() * _bcast(scale.double(), x, axis) + xc * _bcast(q.double(), x, axis) + _bcast(
        p.double(), x, axis
    )
    assert dx.dtype == dtype and dx.stride() == x.stride()
    torch.testing.assert_close(dx.double(), ref_dx, **tol)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_moments_keep_digits_under_a_large_offset(fmt):
    """1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 in float would lose every digit."""
    x = _make((4, 6, 33, 35), fmt, torch.float32, offset=1e4)
    mean, var = KERNELS.moments(x, 1)
    ref_mean, ref_var = ref.moments(x, 1)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)


def test_float64_moments_keep_digits_under_a_huge_offset():
    x = _make((2, 3, 50), torch.contiguous_format, torch.float64, offset=1e9)
    mean, var = KERNELS.moments(x, 1)
    ref_mean, ref_var = ref.moments(x, 1)
    torch.testing.assert_close(var, ref_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_half_precision_kernels_use_float32_statistics(dtype, fmt):
    if KERNELS.supports(torch.zeros(1, 1, dtype=dtype), 1) is not None:
        pytest.skip(f"{dtype} kernels not built by this compiler")
    x = _make((3, 8, 9, 10), fmt, dtype, offset=2.0)
    mean, var = KERNELS.moments(x, 1)
    ref_mean, ref_var = ref.moments(x, 1)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-5)
    ones, zeros = torch.ones(3, 8), torch.zeros(8)
    y = KERNELS.apply(x, mean, ones, zeros, 1)
    expected = (x.double() - _bcast(ref_mean, x, 1)).to(dtype)  # one rounding to the input dtype
    assert y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y, expected, rtol=0, atol=float(torch.finfo(dtype).eps) * 8)


def test_supports_rejects_what_it_cannot_run():
    x = torch.randn(2, 3, 4, 5)
    assert "neither channels-first nor channels-last" in KERNELS.supports(x.transpose(2, 3), 1)
    assert KERNELS.supports(x[:, :, ::2], 1) is not None
    assert "dtype torch.int32" in KERNELS.supports(x.to(torch.int32), 1)
    assert KERNELS.supports(x, 0) is not None
    assert KERNELS.supports(x.permute(0, 2, 3, 1).contiguous(), 3) is None


# ---- whole layers, backend 'cpu' against backend 'reference' -------------------------------

# every configuration of the table, as a 2-D layer that keeps running statistics where it can
LAYERS = [v.variant for v in variants(channels_axis=True)]


def _run_layer(name, backend, x, dy, fmt, dtype):
    layer = variant(name).build(x.shape[1], 2, tracking=True).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p_ in layer.parameters():
            p_.copy_(torch.randn(p_.shape, generator=g, dtype=torch.float64))
    outs = []
    with normkit.use_backend(backend):
        for step in range(2):  # two steps: running statistics move twice
            xx = x.clone().requires_grad_()
            y = layer(xx)
            y.backward(dy)
            if step == 0:
                # None: a one-source mix has constant weights, its logits get no gradient
                outs += [y, xx.grad] + [None if p_.grad is None else p_.grad.clone() for p_ in layer.parameters()]
        outs += [b.clone() for b in layer.buffers() if b.is_floating_point()]
        layer.eval()
        outs.append(layer(x))
    return outs, y


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_layers_match_reference_path(name, fmt):
    shape = (4, variant(name).channels(6), 5, 7)
    x = _make(shape, fmt, torch.float64, offset=1.0)
    dy = _make(shape, torch.contiguous_format, torch.float64, seed=5)  # other layout than x
    want, _ = _run_layer(name, "reference", x, dy, fmt, torch.float64)
    got, y = _run_layer(name, "cpu", x, dy, fmt, torch.float64)
    assert FUSED in type(y.grad_fn).__name__  # really ran the compiled path
    assert y.stride() == x.stride()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_float32_layers_match_reference_path():
    x = _make((8, 16, 9, 9), torch.channels_last, torch.float32, offset=100.0)
    dy = _make((8, 16, 9, 9), torch.channels_last, torch.float32, seed=3)
    want, _ = _run_layer("sn-in-ln-bn-gn2", "reference", x.double(), dy.double(), None, torch.float64)
    got, _ = _run_layer("sn-in-ln-bn-gn2", "cpu", x, dy, None, torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_channels_last_axis_and_expanded_grad():
    sn = normkit.SwitchNorm1d(5, axis=-1).double()
    x = torch.randn(3, 11, 5, dtype=torch.float64)
    with normkit.use_backend("reference"):
        xr = x.clone().requires_grad_()
        sn(xr).sum().backward()
    xc = x.clone().requires_grad_()
    with normkit.use_backend("cpu"):
        y = sn(xc)
        y.sum().backward()  # dy is an expanded (stride-0) tensor
    assert FUSED in type(y.grad_fn).__name__
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-10, atol=1e-10)


def test_frozen_and_eval_modes_read_running_statistics():
    bn = normkit.SwitchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    grads = []
    for backend in ("reference", "cpu"):
        xx = x.clone().requires_grad_()
        with normkit.use_backend(backend):
            y = bn(xx)
        (y * y).sum().backward()
        grads.append((y, xx.grad, bn.mean_logits.grad.clone()))
        bn.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_through_c_mixer():
    sn = normkit.SwitchNorm2d(4, sources=("in", "ln", "bn", "gn2")).double()
    with torch.no_grad():
        sn.mean_logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        sn.var_logits.copy_(torch.tensor([-0.1, 0.4, 0.0, 0.2]))
        sn.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    params = (sn.weight, sn.bias, sn.mean_logits, sn.var_logits)

    def f(x, w, b, ml, vl):
        return normkit.functional.switch_norm(x, None, None, w, b, ml, vl, sn.sources, training=True)

    with normkit.use_backend("cpu"):
        assert FUSED in type(f(x, *params).grad_fn).__name__
        assert torch.autograd.gradcheck(f, (x, *params))
        # double backward goes through the reference graph
        assert torch.autograd.gradgradcheck(f, (x, *params))


def test_large_input_uses_threads_and_matches():
    x = _make((4, 32, 40, 40), torch.contiguous_format, torch.float32, offset=5.0)
    mean, var = KERNELS.moments(x, 1)
    ref_mean, ref_var = ref.moments(x, 1)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-5)
    xl = x.contiguous(memory_format=torch.channels_last)
    mean_l, var_l = KERNELS.moments(xl, 1)
    torch.testing.assert_close(mean_l, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var_l, var, rtol=1e-5, atol=1e-5)


# ---- a library that cannot load ------------------------------------------------------------

@pytest.fixture
def cpu_unavailable(monkeypatch):
    """Pretend the CPU library failed verification; restore the loaded set afterwards."""
    def refuse(name):
        raise KernelUnavailable("the library's sha256 does not match its manifest (test)")

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_reasons", {})
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(kernels, "_import_set", refuse)


def test_unloadable_library_falls_back_and_says_why(cpu_unavailable):
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="no fused kernels for cpu tensors .*sha256 does not match"):
        y = normkit.SwitchNorm2d(3)(x)  # still works, on the reference path
    assert y.grad_fn is not None and FUSED not in type(y.grad_fn).__name__
    normkit.SwitchNorm2d(3)(x)  # warns once only (warnings are errors in the tests)
    report = kernels.status()
    assert report["cpu"]["kernels"] is None and "sha256 does not match" in report["cpu"]["reason"]
    with pytest.raises(RuntimeError, match="'cpu' kernels are not available: .*sha256"):
        normkit.set_backend("cpu")
    with pytest.raises(RuntimeError, match="'cpu' kernels are not available"):
        with normkit.use_backend("cpu"):
            pass


def test_status_names_the_kernels_that_serve_each_device():
    report = kernels.status()
    assert report["backend"] == normkit.get_backend()
    if report["backend"] in ("auto", "cpu"):
        assert report["cpu"] == {"kernels": "cpu", "reason": None, "device_present": True}
    with normkit.use_backend("reference"):
        assert kernels.status()["cpu"]["kernels"] is None
