"""Masks for padded inputs and the channels-last ``axis`` across the whole family (issue 7).

The promise: a masked layer on a padded batch gives exactly what the layer would give on the
packed valid values (each sample's valid positions for the per-sample sources IN / LN / GN, all
valid positions of the batch for BN): outputs at valid positions, gradients, running averages.
The references (reference.py) are written in float64 from the definitions, sample by sample
on the packed values; they share no code with normkit. The layers are every configuration of
the one layer table (common_layers.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import normkit
import reference as ref
from common_layers import variant, variants
from normkit import functional as F

C = 4  # channels in every case (even, for the 'gn2' source)
DOUBLE = torch.float64


# ------------------------------------------------------------------------------------------
# the layers under test: every configuration of the table (common_layers.py), rebuilt at C
# channels (or the least multiple of C its group counts divide)

KINDS = [v.variant for v in variants(masks=True, channels_axis=True)]


def channels(kind: str) -> int:
    return variant(kind).channels(C)


def make_layer(kind: str, dim: int, axis: int = 1) -> tuple[nn.Module, tuple[str, ...], Optional[str]]:
    """A float64 layer with random parameters, its sources and its running-statistics kind."""
    case = variant(kind)
    layer = case.build(channels(kind), dim, axis, tracking=True).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        if case.running is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    return layer, case.sources, case.running


def reference_of(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, sources, axis: int, **kw) -> torch.Tensor:
    """The float64 reference on the packed valid values, with the layer's parameters."""
    return ref.of_layer(layer, x, sources, axis, mask=mask, **kw)


def running_reference(x, mask, kind, momentum, old, axis=1):
    """Running mean / var after one training step on the valid values."""
    return ref.running_after([x], momentum, axis, kind=kind, masks=[mask], start=old)


def layout(x_ncs: torch.Tensor, axis: int) -> torch.Tensor:
    """(N, C, *S) -> the layer's layout (channels-last for axis=-1)."""
    return x_ncs if axis == 1 else x_ncs.movedim(1, -1).contiguous()


def assert_close(actual, expected, atol=1e-9, rtol=1e-7):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


def grads_of(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d inputs, zeros for inputs the loss does not depend on."""
    inputs = list(inputs)
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def check_against_reference(layer, sources, running, x, mask, axis, atol=1e-9):
    """Forward + backward of the masked layer and of the packed reference; compare all."""
    old = None if running is None else (layer.running_mean.clone(), layer.running_var.clone())
    xl = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    y = layer(xl, mask)
    params = dict(layer.named_parameters())
    ref_params = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    y_ref = ref.from_params(xr, sources, ref_params, layer.eps, axis, mask=mask)
    padded = ~F.mask_for(x, mask, F.normalize_axis(axis, x.dim())).expand_as(x)
    assert_close(y, y_ref, atol=atol)
    assert torch.all(y[padded] == 0), "padded outputs must be 0"
    g = torch.randn_like(y)
    grads = grads_of((y * g).sum(), [xl, *params.values()])
    ref_grads = grads_of((y_ref * g).sum(), [xr, *ref_params.values()])
    assert torch.all(grads[0][padded] == 0), "padded positions must receive no gradient"
    for name, got, want in zip(["x", *params], grads, ref_grads):
        torch.testing.assert_close(got, want, atol=atol * 10, rtol=1e-6, msg=lambda m: f"grad of {name}: {m}")
    if running is not None:
        want_mean, want_var = running_reference(x, mask, running, layer.momentum, old, axis)
        assert_close(layer.running_mean, want_mean)
        assert_close(layer.running_var, want_var)


@st.composite
def padded_batches(draw, dim: int):
    """(seed, N, spatial shape, mask) with random masks, all-False samples included."""
    n = draw(st.integers(1, 4))
    spatial = (draw(st.integers(1, 6)),) if dim == 1 else (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    size = n * math.prod(spatial)
    bits = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    empty = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(n, *spatial)
    mask[torch.tensor(empty)] = False
    return draw(st.integers(0, 2**31 - 1)), n, spatial, mask


HYPOTHESIS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------
# masked layer == layer on the packed values


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
@HYPOTHESIS
@given(data=st.data())
def test_masked_layer_equals_packed_reference(kind, dim, axis, data):
    seed, n, spatial, mask = data.draw(padded_batches(dim))
    torch.manual_seed(seed)
    layer, sources, running = make_layer(kind, dim, axis)
    x = layout(torch.randn(n, channels(kind), *spatial, dtype=DOUBLE) * 2 + 0.5, axis)
    check_against_reference(layer, sources, running, x, mask, axis)


@pytest.mark.parametrize("kind", [v.variant for v in variants(masks=True, running=True)])
def test_second_training_step_and_eval_use_masked_running_stats(kind):
    layer, sources, running = make_layer(kind, 1)
    c = channels(kind)
    x = torch.randn(3, c, 6, dtype=DOUBLE)
    lengths = torch.tensor([6, 2, 0])
    mask = torch.arange(6) < lengths[:, None]
    for _ in range(2):  # two steps: the running averages compound correctly
        check_against_reference(layer, sources, running, x, mask, 1)
    layer.eval()
    x_eval = torch.randn(2, c, 5, dtype=DOUBLE)
    mask_eval = torch.arange(5) < torch.tensor([3, 5])[:, None]
    frozen = (layer.running_mean.clone(), layer.running_var.clone())
    if running == "in":  # torch.nn.InstanceNorm in eval: the running statistics replace the IN ones
        want = ref.switch_norm(x_eval, ("bn",), weight=layer.weight, bias=layer.bias, running=frozen) * mask_eval[:, None]
    else:
        want = reference_of(layer, x_eval, mask_eval, sources, 1, running=frozen)
    assert_close(layer(x_eval, mask_eval), want)
    assert torch.equal(layer.running_mean, frozen[0]) and torch.equal(layer.running_var, frozen[1])


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kind", KINDS)
def test_equal_length_mask_equals_unmasked_layer_on_packed_batch(kind, axis, backend):
    """When every sample has k valid positions the packed values form a batch, so the
    unmasked layer itself (any backend) can run on them."""
    layer, _, running = make_layer(kind, 1, axis)
    twin = make_layer(kind, 1, axis)[0]
    twin.load_state_dict(layer.state_dict())
    n, length, k, c = 3, 7, 4, channels(kind)
    x = torch.randn(n, c, length, dtype=DOUBLE)
    keep = torch.stack([torch.randperm(length)[:k].sort().values for _ in range(n)])  # (N, k)
    mask = torch.zeros(n, length, dtype=torch.bool).scatter_(1, keep, True)
    packed = x.gather(2, keep[:, None, :].expand(n, c, k))
    index = keep[:, None, :].expand(n, c, k)
    xl, xp = layout(x, axis).requires_grad_(), layout(packed, axis).requires_grad_()
    y, y_packed = layer(xl, mask), twin(xp)
    g = torch.randn(n, c, k, dtype=DOUBLE)
    g_full = torch.zeros(n, c, length, dtype=DOUBLE).scatter_(2, index, g)
    assert_close(y.movedim(axis, 1).gather(2, index), y_packed.movedim(axis, 1))
    grads = grads_of((y * layout(g_full, axis)).sum(), [xl, *layer.parameters()])
    grads_packed = grads_of((y_packed * layout(g, axis)).sum(), [xp, *twin.parameters()])
    dx = grads[0].movedim(axis, 1)
    assert_close(dx.gather(2, index), grads_packed[0].movedim(axis, 1))
    assert torch.all(dx[~mask[:, None, :].expand_as(dx)] == 0)
    for got, want in zip(grads[1:], grads_packed[1:]):
        assert_close(got, want)
    if running is not None:
        assert_close(layer.running_mean, twin.running_mean)
        assert_close(layer.running_var, twin.running_var)


@pytest.mark.parametrize(
    "shape, mask_shape",
    [((3, C, 5), (3, 1)), ((3, C, 5), (1, 5)), ((2, C, 3, 4), (2, 1, 4)), ((2, C, 3, 4), (1, 3, 1))],
)
@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_masks(kind, shape, mask_shape):
    layer, sources, running = make_layer(kind, len(shape) - 2)
    shape = (shape[0], channels(kind), *shape[2:])
    mask = torch.rand(mask_shape) < 0.6
    mask.view(-1)[0] = True
    x = torch.randn(shape, dtype=DOUBLE)
    full = mask.broadcast_to((shape[0], *shape[2:]))
    old = None if running is None else (layer.running_mean.clone(), layer.running_var.clone())
    assert_close(layer(x, mask), reference_of(layer, x, full, sources, 1))
    if running is not None:
        want = running_reference(x, full, running, layer.momentum, old)
        assert_close(layer.running_mean, want[0])
        assert_close(layer.running_var, want[1])


# ------------------------------------------------------------------------------------------
# LayerNorm: a row mask over the leading dims


@pytest.mark.parametrize("normalized_shape", [(6,), (2, 3)])
@HYPOTHESIS
@given(data=st.data())
def test_layer_norm_row_mask_equals_rows_of_packed_values(normalized_shape, data):
    n, length = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    bits = data.draw(st.lists(st.booleans(), min_size=n * length, max_size=n * length))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(n, length)
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ln = normkit.LayerNorm(normalized_shape).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(n, length, *normalized_shape, dtype=DOUBLE)
    x[~mask] = float("nan")  # padded rows may hold anything
    xl = x.clone().requires_grad_()
    y = ln(xl, mask)
    rows = x[mask].reshape(-1, math.prod(normalized_shape)).clone().requires_grad_()
    w, b = ln.weight.detach().clone().requires_grad_(), ln.bias.detach().clone().requires_grad_()
    centred = rows - rows.mean(1, keepdim=True)
    want_rows = centred / torch.sqrt(centred.square().mean(1, keepdim=True) + ln.eps)
    want_rows = want_rows.reshape(-1, *normalized_shape) * w + b
    assert_close(y[mask], want_rows)
    assert torch.all(y[~mask] == 0)
    g = torch.randn_like(y)
    dx, dw, db = grads_of((y * g).sum(), [xl, ln.weight, ln.bias])
    rdx, rdw, rdb = grads_of((want_rows * g[mask]).sum(), [rows, w, b])
    assert_close(dx[mask], rdx.reshape(-1, *normalized_shape))
    assert torch.all(dx[~mask] == 0)
    assert_close(dw, rdw)
    assert_close(db, rdb)


def test_layer_norm_broadcast_row_mask_and_unmasked_rows_unchanged():
    ln = normkit.LayerNorm(5).double()
    x = torch.randn(3, 4, 5, dtype=DOUBLE)
    per_sample = torch.tensor([[True], [False], [True]])  # (N, 1): whole samples
    y = ln(x, per_sample)
    assert_close(y[[0, 2]], ln(x[[0, 2]]))
    assert torch.all(y[1] == 0)
    shared = torch.tensor([[True, True, False, True]])  # (1, L): the same positions in every sample
    assert_close(ln(x, shared)[:, [0, 1, 3]], ln(x[:, [0, 1, 3]]))


# ------------------------------------------------------------------------------------------
# robustness: empty samples, a fully padded batch, NaN / inf padding, half precision


@pytest.mark.parametrize("kind", KINDS)
def test_fully_padded_batch_changes_nothing_and_gives_no_nan(kind):
    layer, _, running = make_layer(kind, 2)
    old = None if running is None else (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(2, channels(kind), 3, 3, dtype=DOUBLE, requires_grad=True)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    y = layer(x, mask)
    assert torch.equal(y, torch.zeros_like(y))
    for g in grads_of(y.sum(), [x, *layer.parameters()]):
        assert torch.equal(g, torch.zeros_like(g))
    if running is not None:
        assert torch.equal(layer.running_mean, old[0]) and torch.equal(layer.running_var, old[1])


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_in_padded_positions_do_not_leak(kind, axis):
    layer, _, running = make_layer(kind, 1, axis)
    twin = make_layer(kind, 1, axis)[0]
    twin.load_state_dict(layer.state_dict())
    x = layout(torch.randn(4, channels(kind), 6, dtype=DOUBLE), axis)
    mask = torch.arange(6) < torch.tensor([6, 3, 0, 1])[:, None]
    padded = ~F.mask_for(x, mask, F.normalize_axis(axis, 3)).expand_as(x)
    clean = x.masked_fill(padded, 0.0).requires_grad_()
    poisoned = x.clone()
    poisoned[padded] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=DOUBLE).repeat(100)[
        : int(padded.sum())
    ]
    poisoned.requires_grad_()
    y_clean, y_poisoned = twin(clean, mask), layer(poisoned, mask)
    assert torch.equal(y_clean, y_poisoned)
    g = torch.randn_like(y_clean)
    grads_clean = grads_of((y_clean * g).sum(), [clean, *twin.parameters()])
    grads_poisoned = grads_of((y_poisoned * g).sum(), [poisoned, *layer.parameters()])
    for a, b in zip(grads_clean, grads_poisoned):
        assert torch.equal(a, b)
    if running is not None:
        assert torch.equal(layer.running_mean, twin.running_mean)
        assert torch.equal(layer.running_var, twin.running_var)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_masked(kind, dtype, atol):
    layer, sources, running = make_layer(kind, 1, -1)
    layer = layer.float()
    x = (torch.randn(3, 7, channels(kind)) * 3 + 100).to(dtype)  # offset: statistics must be float32 two-pass
    mask = torch.arange(7) < torch.tensor([7, 4, 0])[:, None]
    x[~mask] = float("nan")
    old = None if running is None else (layer.running_mean.clone(), layer.running_var.clone())
    xg = x.clone().requires_grad_()
    y = layer(xg, mask)
    assert y.dtype == dtype
    want = reference_of(layer, x.double(), mask, sources, -1)
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=atol)
    (y.float() * torch.randn(y.shape)).sum().backward()
    assert torch.isfinite(xg.grad.float()).all()
    for name, p in layer.named_parameters():  # a one-source mix has constant weights
        assert (p.grad is None and len(sources) == 1 and "logits" in name) or torch.isfinite(p.grad).all(), name
    if running is not None:
        want_mean, want_var = running_reference(x.double(), mask, running, layer.momentum, old, -1)
        torch.testing.assert_close(layer.running_mean.double(), want_mean, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(layer.running_var.double(), want_var, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------
# gradcheck with masks (functional ops, float64)

GRADCHECK_MASK = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("op", ["switch_norm", "batch_norm", "group_norm", "instance_norm"])
def test_gradcheck_with_mask(op, axis):
    x = layout(torch.randn(3, C, 5, dtype=DOUBLE), axis).requires_grad_()
    w = torch.randn(C, dtype=DOUBLE, requires_grad=True)
    b = torch.randn(C, dtype=DOUBLE, requires_grad=True)
    logits = [torch.randn(4, dtype=DOUBLE, requires_grad=True) for _ in range(2)]
    kw = {"channel_axis": axis, "mask": GRADCHECK_MASK}
    fns = {
        "switch_norm": lambda x, w, b, ml, vl: F.switch_norm(
            x, None, None, w, b, ml, vl, ("in", "ln", "bn", "gn2"), True, **kw
        ),
        "batch_norm": lambda x, w, b: F.batch_norm(x, None, None, w, b, True, **kw),
        "group_norm": lambda x, w, b: F.group_norm(x, 2, w, b, **kw),
        "instance_norm": lambda x, w, b: F.instance_norm(x, None, None, w, b, **kw),
    }
    inputs = (x, w, b, *logits) if op == "switch_norm" else (x, w, b)
    assert torch.autograd.gradcheck(fns[op], inputs)


def test_gradcheck_layer_norm_with_row_mask():
    x = torch.randn(3, 5, C, dtype=DOUBLE, requires_grad=True)
    w = torch.randn(C, dtype=DOUBLE, requires_grad=True)
    b = torch.randn(C, dtype=DOUBLE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: F.layer_norm(x, (C,), w, b, mask=GRADCHECK_MASK), (x, w, b))


# ------------------------------------------------------------------------------------------
# axis=-1 and channels_last memory format: the channels-first numerics exactly


def _run(layer, x, mask, g):
    x = x.clone().requires_grad_()
    y = layer(x, mask)
    return y, grads_of((y * g).sum(), [x, *layer.parameters()])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_axis_equals_channels_first(kind, dim, masked, backend):
    first, _, running = make_layer(kind, dim, 1)
    last = make_layer(kind, dim, -1)[0]
    last.load_state_dict(first.state_dict())
    spatial = (6,) if dim == 1 else (3, 5)
    x = torch.randn(4, channels(kind), *spatial, dtype=DOUBLE) * 3 + 7
    mask = (torch.rand(4, *spatial) < 0.7) if masked else None
    if masked:
        mask[1] = False
    x_last = x.movedim(1, -1).contiguous()  # (N, L, C) / (N, H, W, C)
    g = torch.randn_like(x)
    y_first, g_first = _run(first, x, mask, g)
    y_last, g_last = _run(last, x_last, mask, g.movedim(1, -1))
    tol = {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(y_last.movedim(-1, 1), y_first, **tol)
    torch.testing.assert_close(g_last[0].movedim(-1, 1), g_first[0], **tol)
    for a, b in zip(g_last[1:], g_first[1:]):
        torch.testing.assert_close(a, b, **tol)
    if running is not None:
        torch.testing.assert_close(last.running_mean, first.running_mean, **tol)
        torch.testing.assert_close(last.running_var, first.running_var, **tol)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_memory_format(kind, masked, backend):
    layer, sources, _ = make_layer(kind, 2)
    twin = make_layer(kind, 2)[0]
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(3, channels(kind), 4, 5, dtype=DOUBLE)
    mask = (torch.rand(3, 4, 5) < 0.7) if masked else None
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    g = torch.randn_like(x)
    y, grads = _run(layer, x_cl, mask, g)
    y_ref, grads_ref = _run(twin, x, mask, g)
    tol = {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(y, y_ref, **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol)
    full = mask if masked else torch.ones(3, 4, 5, dtype=torch.bool)
    assert_close(y, reference_of(layer, x, full, sources, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_3d_volumes(kind):
    first, sources, _ = make_layer(kind, 3, 1)
    last = make_layer(kind, 3, -1)[0]
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, channels(kind), 3, 2, 4, dtype=DOUBLE)
    mask = torch.rand(2, 3, 2, 4) < 0.6
    y_first = first(x.contiguous(memory_format=torch.channels_last_3d), mask)
    y_last = last(x.movedim(1, -1), mask)
    torch.testing.assert_close(y_last.movedim(-1, 1), y_first, atol=1e-12, rtol=1e-12)
    assert_close(y_first, reference_of(first, x, mask, sources, 1))


# ------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(3, 5), r"mask must be a bool tensor \(True = valid position\), got torch\.float32; convert it with mask\.bool\(\)"),
        (torch.tensor([5, 3, 2]), r"mask must be a bool tensor .* got torch\.int64"),
        ([[True] * 5] * 3, r"mask must be a bool tensor .* got list"),
        (torch.ones(3, dtype=torch.bool), r"mask must have 2 dims, the shape of the input without its channel axis \(3, 5\) .* got shape \(3,\); add size-1 dims, e.g. mask\[None\]"),
        (torch.ones(3, 1, 5, dtype=torch.bool), r"mask must have 2 dims, .* got shape \(3, 1, 5\); drop the extra dims"),
        (torch.ones(3, 6, dtype=torch.bool), r"mask of shape \(3, 6\) does not broadcast to the shape of the input without its channel axis \(3, 5\)"),
        (torch.ones(3, 5, dtype=torch.bool, device="meta"), r"mask is on meta but the input is on cpu; move it with mask\.to\(x\.device\)"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_mask_errors(kind, mask, match):
    layer = make_layer(kind, 1)[0]
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(3, channels(kind), 5, dtype=DOUBLE), mask)


def test_mask_errors_channels_last_and_functional():
    layer = normkit.BatchNorm1d(C, axis=-1)
    with pytest.raises(ValueError, match=r"does not broadcast to the shape of the input without its channel axis \(3, 5\)"):
        layer(torch.randn(3, 5, C), torch.ones(3, C, dtype=torch.bool))  # a (N, C) mask: wrong axis
    with pytest.raises(ValueError, match=r"mask must have 1 dims, the shape of the input without its channel axis \(3,\)"):
        normkit.BatchNorm1d(C)(torch.randn(3, C), torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        F.moments(torch.randn(2, C, 3), 1, torch.ones(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 3, 5, dtype=torch.bool), r"mask must have 2 dims, the shape of the input's leading dims \(2, 3\) .* got shape \(2, 3, 5\)"),
        (torch.ones(2, 4, dtype=torch.bool), r"mask of shape \(2, 4\) does not broadcast to the shape of the input's leading dims \(2, 3\)"),
        (torch.ones(2, 3), r"mask must be a bool tensor .* got torch\.float32"),
    ],
)
def test_layer_norm_mask_errors(mask, match):
    with pytest.raises(ValueError, match=match):
        normkit.LayerNorm(5)(torch.randn(2, 3, 5), mask)


# ------------------------------------------------------------------------------------------
# recompute_stats feeds masks through


class PaddedSeqNet(nn.Module):
    """Norm layers that take the batch's mask, channels-first and channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = normkit.BatchNorm1d(C)
        self.sn = normkit.SwitchNorm1d(C, sources=("in", "ln", "bn", "gn2"))
        self.inorm = normkit.InstanceNorm1d(C, track_running_stats=True, axis=-1)

    def forward(self, x, mask=None):
        y = self.sn(self.bn(x, mask), mask)
        return self.inorm(y.transpose(1, 2), mask)


def test_recompute_stats_with_masked_dict_batches_equals_packed():
    torch.manual_seed(3)
    net = PaddedSeqNet().double()
    packed_net = PaddedSeqNet().double()
    padded_batches, packed_batches = [], []
    for n, length, k in [(3, 7, 4), (2, 5, 5), (4, 6, 2)]:
        x = torch.randn(n, C, length, dtype=DOUBLE) * 2 + 1
        keep = torch.stack([torch.randperm(length)[:k].sort().values for _ in range(n)])
        mask = torch.zeros(n, length, dtype=torch.bool).scatter_(1, keep, True)
        padded_batches.append({"x": x.masked_fill(~mask[:, None], float("nan")), "mask": mask})
        packed_batches.append(x.gather(2, keep[:, None, :].expand(n, C, k)))
    report = normkit.recompute_stats(net, padded_batches)
    normkit.recompute_stats(packed_net, packed_batches)
    assert sorted(report.updated) == ["bn", "inorm", "sn"]
    for name in ("bn", "sn", "inorm"):
        a, b = getattr(net, name), getattr(packed_net, name)
        assert_close(a.running_mean, b.running_mean, atol=1e-12)
        assert_close(a.running_var, b.running_var, atol=1e-12)
    # The first layer's statistics from the definition: all valid values of all batches.
    mean, var = ref.pooled(packed_batches)
    assert_close(net.bn.running_mean, mean, atol=1e-12)
    assert_close(net.bn.running_var, var, atol=1e-12)


def test_recompute_stats_ragged_masks():
    net = PaddedSeqNet().double()
    x = torch.randn(3, C, 6, dtype=DOUBLE)
    mask = torch.arange(6) < torch.tensor([6, 1, 0])[:, None]
    normkit.recompute_stats(net, [{"x": x, "mask": mask}])
    mean, var = ref.pooled([x], masks=[mask])  # sample 1 has one valid value, sample 2 none
    assert_close(net.bn.running_mean, mean, atol=1e-12)
    assert_close(net.bn.running_var, var, atol=1e-12)


# ------------------------------------------------------------------------------------------
# docs/MASKS.md runs as written


def test_masks_doc_examples_run():
    doc = Path(__file__).resolve().parents[1] / "docs" / "MASKS.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks, "docs/MASKS.md has no python example"
    namespace: dict = {}
    for block in blocks:  # blocks build on each other, like a notebook
        exec(compile(block, str(doc), "exec"), namespace)
