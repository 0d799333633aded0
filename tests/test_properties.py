"""Property tests: shapes (L = 1, N = 1 included), large offsets and every floating dtype."""

from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
import reference as ref
from common_layers import variant, variants

# every source mix of the layer table's SwitchNorm rows, and a few more
_MIXES = [("in", "ln", "bn"), ("in", "ln"), ("bn",), ("ln", "bn"), ("in", "bn", "gn2")]
_MIXES += [v.sources for v in variants(kind="sn") if v.sources not in _MIXES]
SOURCES = st.sampled_from(_MIXES)
# Tolerances against the float64 reference, relative to the output scale.
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 8e-3}


@st.composite
def inputs(draw):
    n = draw(st.integers(1, 4))
    c = draw(st.sampled_from([2, 4, 6]))
    spatial = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    dtype = draw(st.sampled_from(list(TOL)))
    offset = draw(st.sampled_from([0.0, 3.0, -50.0, 1e4]))
    spread = draw(st.sampled_from([1.0, 1e-2, 30.0]))
    return (n, c, *spatial), dtype, offset, spread


def _sn(sources):
    """The table's SwitchNorm with these sources."""
    return replace(variant("sn"), sources=sources)


def _fit(shape, sources):
    """shape with the least multiple of its channel count that every group count divides."""
    return (shape[0], _sn(sources).channels(shape[1]), *shape[2:])


def _layer_dtype(dtype):
    """A layer's dtype for inputs of ``dtype``: float32 for float16 / bfloat16 (mixed precision),
    else the input's (torch refuses a float32 layer on float64 input)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _make(shape, sources):
    m = _sn(sources).build(shape[1], len(shape) - 2)
    with torch.no_grad():
        m.mean_logits.normal_()
        m.var_logits.normal_()
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    return m


@settings(max_examples=60, deadline=None)
@given(inputs(), SOURCES, st.sampled_from(["reference", "auto"]))
def test_switch_norm_any_shape_offset_dtype(case, sources, backend):
    shape, dtype, offset, spread = case
    shape = _fit(shape, sources)
    m = _make(shape, sources).to(_layer_dtype(dtype))
    x = (torch.randn(shape, dtype=torch.float64) * spread + offset).to(dtype)
    with normkit.use_backend(backend):
        y = m(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    expected = ref.of_layer(m, x, sources).detach()
    # Low-precision inputs are quantised relative to the offset: the error scales with
    # |offset| / spread in units of the input's resolution.
    res = torch.finfo(dtype).eps * max(1.0, abs(offset) / spread)
    tol = TOL[dtype] + 4 * res * expected.abs().max().item()
    assert (y.double() - expected).abs().max().item() <= tol + 1e-6 * (dtype != torch.float64)


@settings(max_examples=30, deadline=None)
@given(inputs())
def test_running_stats_stay_finite_in_the_layer_dtype(case):
    shape, dtype, offset, spread = case
    m = _make(shape, ("in", "ln", "bn")).to(_layer_dtype(dtype))
    x = (torch.randn(shape, dtype=torch.float64) * spread + offset).to(dtype)
    m(x)
    assert m.running_mean.dtype == _layer_dtype(dtype) and torch.isfinite(m.running_var).all()
    values_per_channel = x.numel() // shape[1]
    if values_per_channel > 1:
        expected = ref.pooled([x])[1]
        torch.testing.assert_close(
            m.running_var.double(), 0.9 + 0.1 * expected, rtol=1e-3, atol=TOL[dtype] * (1 + abs(offset)) ** 2 * 0.1
        )


def test_large_offset_float32_is_exact_where_naive_formula_fails():
    """x = 1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 gives garbage; normkit must not."""
    x = torch.randn(8, 4, 16, 16, dtype=torch.float64) + 1e4
    x32 = x.float()
    m = normkit.SwitchNorm2d(4)
    y = m(x32)
    expected = ref.switch_norm(x32, ("in", "ln", "bn"))
    assert (y.double() - expected).abs().max() < 2e-3
    naive_var = (x32 * x32).mean((2, 3)) - x32.mean((2, 3)) ** 2
    true_var = x32.double().var((2, 3), correction=0)
    assert (naive_var.double() - true_var).abs().max() > 0.1, "the naive formula really does cancel here"
