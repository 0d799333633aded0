"""torch.func transforms and torch's gradcheck (batched gradients on) on the default
backend: every layer of the table equals the reference backend, in training (batch
statistics, no running buffers: torch.nn's own norms cannot update buffers under a
transform either) and in eval."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, vmap

import normkit
from common_layers import CASES, LAYER_NORM_CASES

ALL = CASES + LAYER_NORM_CASES


def _layer(case, training):
    m = case.make().double()
    if training and getattr(m, "running_mean", None) is not None:
        kwargs = {"track_running_stats": False}
        m = type(m)(**_ctor_args(m, kwargs)).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" else 0.0))
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return m.train(training)


def _ctor_args(m, override):
    args = {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "axis": m.axis, **override}
    if hasattr(m, "sources"):
        args["sources"] = m.sources
    return args


def _both(fn):
    """fn() on the default backend and on the reference backend."""
    got = fn()
    with normkit.use_backend("reference"):
        want = fn()
    return got, want


def _close(got, want):
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ALL, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vmap(case, training):
    m = _layer(case, training)
    xs = torch.randn(3, *case.shape, dtype=torch.float64)
    _close(*_both(lambda: vmap(m)(xs)))


@pytest.mark.parametrize("case", ALL, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jacrev_and_jvp(case, training):
    m = _layer(case, training)
    x = torch.randn(case.shape, dtype=torch.float64)
    _close(*_both(lambda: jacrev(m)(x)))
    t = torch.randn_like(x)
    _close(*_both(lambda: jvp(m, (x,), (t,))))


@pytest.mark.parametrize("case", ALL, ids=str)
def test_forward_mode_ad(case):
    m = _layer(case, False)
    x, t = torch.randn(case.shape, dtype=torch.float64), torch.randn(case.shape, dtype=torch.float64)

    def tangent():
        with torch.autograd.forward_ad.dual_level():
            return torch.autograd.forward_ad.unpack_dual(m(torch.autograd.forward_ad.make_dual(x, t))).tangent

    _close(*_both(tangent))


@pytest.mark.parametrize("case", ALL, ids=str)
def test_per_sample_gradients(case):
    m = _layer(case, False)  # eval: each sample is normalised on its own statistics or the running ones
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(case.shape, dtype=torch.float64)

    def loss(p, sample):
        return functional_call(m, p, (sample[None],)).square().sum()

    _close(*_both(lambda: vmap(grad(loss), in_dims=(None, 0))(params, x)))


@pytest.mark.parametrize("case", ALL, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_with_batched_gradients(case, training):
    m = _layer(case, training)
    names = [k for k, _ in m.named_parameters()]
    x = torch.randn(case.shape, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().requires_grad_() for p in m.parameters())

    def f(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,))

    if normkit.kernels.load("cpu") is not None and case not in LAYER_NORM_CASES:
        assert "_LayerFunction" in type(f(x, *params).grad_fn).__name__  # the fused operator runs
    assert torch.autograd.gradcheck(f, (x, *params), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, *params))
