"""Property tests: shapes (L = 1, N = 1 included), large offsets and every floating dtype."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
import reference as ref

SOURCES = st.sampled_from([("in", "ln", "bn"), ("in", "ln"), ("bn",), ("ln", "bn"), ("in", "bn", "gn2")])
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


def _make(shape, sources):
    cls = {2: normkit.SwitchNorm1d, 3: normkit.SwitchNorm1d, 4: normkit.SwitchNorm2d}[len(shape)]
    m = cls(shape[1], sources=sources)
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
    m = _make(shape, sources)
    x = (torch.randn(shape, dtype=torch.float64) * spread + offset).to(dtype)
    with normkit.use_backend(backend):
        y = m(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    wm, wv = (torch.softmax(t.detach().double(), 0).tolist() for t in (m.mean_logits, m.var_logits))
    expected = ref.switch_norm(x, sources, wm, wv, m.weight, m.bias, m.eps)
    # Low-precision inputs are quantised relative to the offset: the error scales with
    # |offset| / spread in units of the input's resolution.
    res = torch.finfo(dtype).eps * max(1.0, abs(offset) / spread)
    tol = TOL[dtype] + 4 * res * expected.abs().max().item()
    assert (y.double() - expected).abs().max().item() <= tol + 1e-6 * (dtype != torch.float64)


@settings(max_examples=30, deadline=None)
@given(inputs())
def test_running_stats_stay_finite_and_float32(case):
    shape, dtype, offset, spread = case
    m = _make(shape, ("in", "ln", "bn"))
    x = (torch.randn(shape, dtype=torch.float64) * spread + offset).to(dtype)
    m(x)
    assert m.running_mean.dtype == torch.float32 and torch.isfinite(m.running_var).all()
    values_per_channel = x.numel() // shape[1]
    if values_per_channel > 1:
        expected = x.double().movedim(1, 0).reshape(shape[1], -1).var(1)
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
