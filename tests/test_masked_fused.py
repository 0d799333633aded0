"""Masked calls on the generic fused path (the masked C passes) equal the masked reference path.

A masked call on CPU runs the CPU kernel set's four masked passes around the Python mix
(``normkit.kernels._generic``); ``normkit.use_backend("reference")`` runs the plain autograd
path that was, until now, the only one that took masks. For every layer configuration of the
table (common_layers.py), 1-D and 2-D, channels-first and channels-last, float32 and float64,
and several mask patterns, with NaN and inf in the padded input *and* the padded output
gradient, the two agree on y, dx, every parameter gradient and the running statistics;
padded outputs and input gradients are exactly 0.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normkit
from common_layers import LAYER_NORM_CASES, Case, variants
from normkit import functional as F
from normkit.kernels import cpu
from normkit.kernels._generic import generic_normalize
from normkit.kernels.aten import ATEN_KERNELS

FUSED = "_MaskedLayerFunctionBackward"  # the masked passes around the C mixer
GENERIC = "_GenericNormBackward"  # the masked passes around the Python mix
C = 6  # channels (divisible by every group count of the table: 2, 3)

# every configuration with a channel axis, plus layer norm as a one-group group norm
LAYERS = variants(channels_axis=True) + [Case("ln-as-gn1", "gn", (3, 6, 5), groups=1)]
KINDS = [c.variant for c in LAYERS]
BY_KIND = dict(zip(KINDS, LAYERS))
PATTERNS = ["tail", "holes", "empty-sample", "broadcast"]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def make_mask(pattern: str, n: int, positions: tuple, g: torch.Generator) -> torch.Tensor:
    """A bool mask of x's shape without its channel axis (same rank; may broadcast)."""
    if pattern == "broadcast":  # shared by every sample: (1, L) / per sample and column: (N, 1, W)
        if len(positions) == 1:
            m = torch.rand(1, *positions, generator=g) >= 0.3
        else:
            m = torch.rand(n, 1, positions[-1], generator=g) >= 0.3
        m.view(-1)[0] = True
        return m
    if pattern == "tail":  # about 30% padding at the end of each sample's last axis
        last = positions[-1]
        keep = (last * (0.4 + 0.6 * torch.rand(n, generator=g))).long().clamp_min(1)
        m = torch.arange(last) < keep[:, None]
        return m.reshape(n, *([1] * (len(positions) - 1)), last).expand(n, *positions).clone()
    m = torch.rand(n, *positions, generator=g) >= 0.3
    m[(slice(None),) + (0,) * len(positions)] = True  # every sample keeps a position ...
    if pattern == "empty-sample":  # ... but this one
        m[1] = False
    return m


def build(case: Case, dim: int, axis: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = case.build(case.channels(C), dim, axis, tracking=True).to(dtype).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    return layer


def inputs(case: Case, dim: int, axis: int, dtype: torch.dtype, pattern: str, seed: int = 0):
    """x (NaN / inf at padded positions), dy (inf / NaN there too), the mask and its x-shaped view."""
    g = torch.Generator().manual_seed(seed)
    n, c = 4, case.channels(C)
    positions = (9,) if dim == 1 else (4, 5)
    x = torch.randn(n, c, *positions, generator=g, dtype=dtype) * 3 + 1
    mask = make_mask(pattern, n, positions, g)
    valid = mask.expand(n, *positions).unsqueeze(1).expand_as(x)
    x = x.masked_fill(~valid, float("nan"))
    x[~valid & (torch.rand(x.shape, generator=g) < 0.5)] = float("inf")
    dy = torch.randn(x.shape, generator=g, dtype=dtype).masked_fill(~valid, float("inf"))
    dy[~valid & (torch.rand(x.shape, generator=g) < 0.5)] = float("nan")
    if axis == -1:  # channels-last: (N, *positions, C) in memory, the mask unchanged
        x, dy, valid = (t.movedim(1, -1).contiguous() for t in (x, dy, valid))
    return x, dy, mask, valid


def run(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mask, backend: str):
    layer = copy.deepcopy(layer)
    x = x.clone().requires_grad_()
    with normkit.use_backend(backend):
        y = layer(x, mask)
    y.backward(dy)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    buffers = {name: b.clone() for name, b in layer.named_buffers() if b.is_floating_point()}
    return y.detach(), x.grad, grads, buffers, type(y.grad_fn).__name__


def assert_same(fused, ref, dtype, valid):
    y, dx, grads, buffers, kind = fused
    y_r, dx_r, grads_r, buffers_r, kind_r = ref
    assert kind == FUSED and kind_r != FUSED
    tol = TOL[dtype]
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert (y[~valid] == 0).all() and (dx[~valid] == 0).all()
    torch.testing.assert_close(y, y_r, **tol)
    torch.testing.assert_close(dx, dx_r, **tol)
    assert grads.keys() == grads_r.keys()
    for name in grads:
        if grads[name] is None or grads_r[name] is None:  # (an unused logit: SN with one source)
            assert grads[name] is None and grads_r[name] is None, name
            continue
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], grads_r[name], **tol, msg=lambda m: f"{name}: {m}")
    for name in buffers:
        torch.testing.assert_close(buffers[name], buffers_r[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [1, -1], ids=["ncl", "nlc"])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_reference(kind, dim, axis, dtype):
    case = BY_KIND[kind]
    for seed, pattern in enumerate(PATTERNS):
        layer = build(case, dim, axis, dtype, seed)
        x, dy, mask, valid = inputs(case, dim, axis, dtype, pattern, seed)
        fused = run(layer, x, dy, mask, "cpu")
        ref = run(layer, x, dy, mask, "reference")
        assert_same(fused, ref, dtype, valid)
        assert run(layer, x, dy, mask, "auto")[-1] == FUSED  # what 'auto' picks on CPU


@pytest.mark.parametrize("kind", ["sn", "bn", "in-affine", "gn2", "brn"])
@pytest.mark.parametrize("axis", [1, -1], ids=["ncl", "nlc"])
def test_eval_and_frozen(kind, axis):
    """Statistics read from the running averages (eval): same outputs and gradients."""
    case = BY_KIND[kind]
    layer = build(case, 1, axis, torch.float64).eval()
    x, dy, mask, valid = inputs(case, 1, axis, torch.float64, "holes")
    assert_same(run(layer, x, dy, mask, "cpu"), run(layer, x, dy, mask, "reference"), torch.float64, valid)


@pytest.mark.parametrize("case", LAYER_NORM_CASES, ids=str)
def test_layer_norm_rows(case):
    """LayerNorm with a row mask: its rows run the fused masked path (C = 1, L = the row)."""
    torch.manual_seed(0)
    layer = case.make().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(case.shape, dtype=torch.float64)
    lead = x.shape[: x.dim() - len(layer.normalized_shape)]
    mask = torch.rand(lead) > 0.3
    rows = mask.reshape(*lead, *([1] * len(layer.normalized_shape))).expand_as(x)
    x = x.masked_fill(~rows, float("nan"))
    dy = torch.randn_like(x).masked_fill(~rows, float("inf"))
    outs = []
    for backend in ("cpu", "reference"):
        xx = x.clone().requires_grad_()
        m = copy.deepcopy(layer)
        with normkit.use_backend(backend):
            y = m(xx, mask)
        y.backward(dy)
        outs.append((y.detach(), xx.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert (outs[0][0][~rows] == 0).all() and (outs[0][1][~rows] == 0).all()


@pytest.mark.parametrize("axis", [1, -1], ids=["ncl", "nlc"])
def test_gradcheck_fused(axis):
    """float64 gradcheck (and gradgradcheck: the differentiable backward) through the fused path."""
    torch.manual_seed(0)
    n, c, length = 3, 4, 5
    mask = torch.rand(n, length) > 0.3
    mask[0] = True
    mask[2] = False  # a sample with no valid position
    shape = (n, c, length) if axis == 1 else (n, length, c)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(c, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ml, vl = (torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def f(x, w, b, ml, vl):
        return F.switch_norm(x, None, None, w, b, ml, vl, training=True, channel_axis=axis, mask=mask)

    with normkit.use_backend("cpu"):
        assert type(f(x, w, b, ml, vl).grad_fn).__name__ == FUSED
        assert torch.autograd.gradcheck(f, (x, w, b, ml, vl))
        assert torch.autograd.gradgradcheck(f, (x, w, b, ml, vl))


def test_double_backward_ignores_padding():
    """The differentiable backward (create_graph) keeps NaN padding out too."""
    torch.manual_seed(0)
    layer = normkit.SwitchNorm1d(4).double()
    mask = torch.arange(6) < torch.tensor([6, 3, 1])[:, None]
    x = torch.randn(3, 4, 6, dtype=torch.float64).masked_fill(~mask[:, None], float("nan")).requires_grad_()
    grads = []
    for backend in ("cpu", "reference"):
        m = copy.deepcopy(layer)
        with normkit.use_backend(backend):
            y = m(x, mask)
            (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad(g.sum(), m.mean_logits)
        grads.append((g.detach(), gg))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_types(dtype):
    if dtype not in cpu.DTYPES:
        pytest.skip("the compiler has no _Float16")
    torch.manual_seed(0)
    mask = torch.rand(4, 20) > 0.3
    x = torch.randn(4, 8, 20).masked_fill(~mask[:, None], float("nan")).to(dtype)
    outs = []
    for backend in ("cpu", "reference"):
        with normkit.use_backend(backend):
            outs.append(F.batch_norm(x, None, None, training=True, mask=mask))
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=0.05, rtol=0.02)
    assert (outs[0][~mask[:, None].expand_as(x)] == 0).all()


def test_routing():
    """Only a kernel set that declares masks receives one; masked calls never take the layer operator."""
    assert normkit.kernels.load("cpu").masks and not ATEN_KERNELS.masks
    assert normkit.kernels.KernelSet("x", *ATEN_KERNELS[1:6]).masks is False
    layer = normkit.SwitchNorm1d(4)
    x = torch.randn(2, 4, 5, requires_grad=True)
    mask = torch.rand(2, 5) > 0.3
    with normkit.use_backend("aten"):  # declares no masks: the reference path
        assert type(layer(x, mask).grad_fn).__name__ != FUSED
        assert type(layer(x).grad_fn).__name__ == GENERIC  # unmasked: its passes
    with normkit.use_backend("cpu"):
        assert type(layer(x, mask).grad_fn).__name__ == FUSED
        assert type(layer(x).grad_fn).__name__ != FUSED  # unmasked SN: the layer operator
    with pytest.raises(ValueError, match="takes no masks"):
        generic_normalize(ATEN_KERNELS, x, 1, None, (), mask)


def test_fake_and_transforms_take_the_reference():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = normkit.BatchNorm1d(4)
    mask = torch.rand(2, 5) > 0.3
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = layer(torch.randn(2, 4, 5), mask)
    assert y.shape == (2, 4, 5)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    masks = torch.rand(3, 2, 5) > 0.3
    f = lambda x, m: F.batch_norm(x, None, None, training=True, mask=m)  # noqa: E731
    with normkit.use_backend("cpu"):
        out = torch.func.vmap(f)(x, masks)
    for i in range(3):
        with normkit.use_backend("reference"):
            torch.testing.assert_close(out[i], f(x[i], masks[i]))


def test_pass_validation():
    """Every mask pointer's tensor is checked before it reaches C."""
    x = torch.randn(2, 3, 4)
    mean, var = cpu._moments(x, 1)
    good = torch.ones(2, 4, dtype=torch.uint8)
    cpu._moments(x, 1, mask=good)
    for bad, why in ((torch.ones(2, 4, dtype=torch.bool), "uint8"), (torch.ones(2, 3, dtype=torch.uint8), "8"),
                     (torch.ones(4, 2, dtype=torch.uint8).t(), "contiguous"), ([1] * 8, "Tensor")):
        with pytest.raises((ValueError, TypeError), match=why):
            cpu._moments(x, 1, mask=bad)
        with pytest.raises((ValueError, TypeError), match=why):
            cpu._apply(x, mean, var, torch.zeros(3), 1, mask=bad)
        with pytest.raises((ValueError, TypeError), match=why):
            cpu._reduce(x, x, mean, 1, mask=bad)
        with pytest.raises((ValueError, TypeError), match=why):
            cpu._backward_apply(x, x, mean, var, mean, mean, 1, mask=bad)


def test_passes_against_definitions():
    """The masked passes alone, both layouts, at large offsets: the shifted sums keep the digits."""
    torch.manual_seed(0)
    n, c, length = 3, 5, 300
    mask = torch.rand(n, length) > 0.3
    mask[2] = False
    m8 = mask.view(torch.uint8)
    base = 1e4 + torch.randn(n, c, length, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        for nlc in (False, True):
            xc = base.to(dtype).masked_fill(~mask[:, None], float("nan"))
            x, axis = (xc.transpose(1, 2).contiguous(), 2) if nlc else (xc, 1)
            mean, var, count = cpu._moments(x, axis, mask=m8)
            xd = base.to(dtype).double()
            cnt = mask.sum(1, dtype=torch.float64)
            w = mask[:, None].double()
            exp_mean = (xd * w).sum(2) / cnt.clamp_min(1)[:, None]
            exp_var = (((xd - exp_mean[..., None]) * w) ** 2).sum(2) / cnt.clamp_min(1)[:, None]
            assert count.flatten().tolist() == cnt.tolist()
            tol = dict(atol=1e-2, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(mean.double(), exp_mean, **tol)
            torch.testing.assert_close(var.double(), exp_var, atol=1e-3 if dtype == torch.float32 else 1e-9,
                                       rtol=1e-3 if dtype == torch.float32 else 1e-9)
            assert (mean[2] == 0).all() and (var[2] == 0).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4), c=st.integers(1, 5), length=st.integers(1, 12), axis=st.sampled_from([1, -1]),
       seed=st.integers(0, 2**16), p=st.floats(0.0, 1.0))
def test_random_shapes_and_masks(n, c, length, axis, seed, p):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, length, generator=g) >= p
    x = torch.randn(n, c, length, generator=g, dtype=torch.float64).masked_fill(~mask[:, None], float("nan"))
    dy = torch.randn(n, c, length, generator=g, dtype=torch.float64).masked_fill(~mask[:, None], float("inf"))
    valid = mask[:, None].expand_as(x)
    if axis == -1:
        x, dy, valid = (t.transpose(1, 2).contiguous() for t in (x, dy, valid))
    torch.manual_seed(seed)
    layer = normkit.SwitchNorm1d(c, axis=axis, sources=("in", "ln", "bn")).double()
    with torch.no_grad():
        layer.mean_logits.normal_()
        layer.var_logits.normal_()
    assert_same(run(layer, x, dy, mask, "cpu"), run(layer, x, dy, mask, "reference"), torch.float64, valid)


@pytest.mark.parametrize("axis", [1, -1], ids=["ncl", "nlc"])
def test_threads(axis):
    """Above the parallel threshold: several threads give the 1-thread result, run after run
    (fixed chunking, static schedules), and equal the reference."""
    torch.manual_seed(0)
    n, c, length = 2, 16, 4096  # N < 4 threads: channels-last splits L into chunks
    mask = torch.rand(n, length) > 0.3
    x = torch.randn(n, c, length, dtype=torch.float64).masked_fill(~mask[:, None], float("nan"))
    dy = torch.randn_like(x).masked_fill(~mask[:, None], float("inf"))
    valid = mask[:, None].expand_as(x)
    if axis == -1:
        x, dy, valid = (t.transpose(1, 2).contiguous() for t in (x, dy, valid))
    layer = normkit.SwitchNorm1d(c, axis=axis).double()
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 3, 3):
            torch.set_num_threads(threads)
            outs.append(run(layer, x, dy, mask, "cpu"))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(outs[1][:2], outs[2][:2]):
        assert torch.equal(a, b)
    assert_same(outs[1], run(layer, x, dy, mask, "reference"), torch.float64, valid)
    assert_same(outs[0], outs[1][:4] + ("WhereBackward0",), torch.float64, valid)


@pytest.mark.parametrize("memory", ["channels_last", "channels_last_3d", "permuted"])
def test_memory_layouts(memory):
    """The mask's positions follow x's dim order in every layout the kernels take: a 4-D
    channels-last tensor with axis=1, 3-D images, channels in the middle of a permuted tensor."""
    torch.manual_seed(0)
    if memory == "channels_last":
        x, axis = torch.randn(3, 4, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last), 1
        mask = torch.rand(3, 5, 6) > 0.3
    elif memory == "channels_last_3d":
        x, axis = torch.randn(2, 4, 3, 5, 2, dtype=torch.float64).to(memory_format=torch.channels_last_3d), 1
        mask = torch.rand(2, 3, 5, 2) > 0.3
    else:  # shape (N, L, C, M) whose memory is (N, C, L, M): channels-first rows over (L, M)
        x, axis = torch.randn(3, 4, 5, 6, dtype=torch.float64).permute(0, 2, 1, 3), 2
        mask = torch.rand(3, 5, 6) > 0.3
    valid = mask.unsqueeze(axis).expand_as(x)
    x[~valid] = float("nan")  # in place: masked_fill and where may not keep the strides
    dy = torch.empty_like(x).copy_(torch.randn(x.shape, dtype=x.dtype))
    dy[~valid] = float("inf")
    assert cpu.layout_of(x, axis) is not None and dy.stride() == x.stride()
    layer = (normkit.SwitchNorm3d if x.dim() == 5 else normkit.SwitchNorm2d)(4, axis=axis).double()
    assert_same(run(layer, x, dy, mask, "cpu"), run(layer, x, dy, mask, "reference"), torch.float64, valid)


def test_generic_masked_path_for_a_spec_no_mixer_knows():
    """A spec type that no C mixer was written for takes the masked passes around its own
    Python mix, with the same results as the masked reference."""
    import dataclasses

    from normkit._core import MixSpec

    @dataclasses.dataclass(frozen=True)
    class OwnSpec(MixSpec):
        pass

    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, dtype=torch.float64) * 3 + 1
    mask = torch.rand(3, 9) > 0.3
    mask[2] = False
    x[~mask[:, None].expand_as(x)] = float("nan")
    w, b = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mw = vw = torch.full((3,), 1 / 3, dtype=torch.float64)
    dy = torch.randn_like(x)
    spec = OwnSpec(("in", "ln", "bn"), 1e-5)
    got = []
    for backend in ("cpu", "reference"):
        xi = x.clone().requires_grad_()
        with normkit.use_backend(backend):
            y = F.normalize(xi, spec, w, b, mw, vw, channel_axis=1, mask=mask)
        (dx,) = torch.autograd.grad(y, [xi], dy)
        got.append((y, dx, type(y.grad_fn).__name__))
    assert got[0][2] == GENERIC
    torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[0][1], got[1][1], rtol=1e-10, atol=1e-10)
