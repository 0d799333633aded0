"""Batch Renormalization: the paper's formula and running update against a float64
reference, exact batch norm at r_max = 1, d_max = 0, Keras' renorm (in a subprocess), the
warm-up schedule, masks, kernels and the tools."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import normkit
import normkit.functional as F

DOUBLE = torch.float64


def _reference(x, weight, bias, mu, var, r_max, d_max, eps, momentum, axis=1, mask=None):
    """Ioffe (2017), Algorithm 1, in float64 on the valid values: ``(y, new_mu, new_var)``."""
    xs = x.to(DOUBLE).movedim(axis, 1)
    c = xs.shape[1]
    values = xs.transpose(0, 1).reshape(c, -1)
    if mask is not None:
        values = values[:, mask.reshape(-1)]
    mu_b, var_b = values.mean(1), values.var(1, correction=0)
    sigma_b, sigma = torch.sqrt(var_b + eps), torch.sqrt(var.double() + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - mu.double()) / sigma).clamp(-d_max, d_max).detach()
    shape = [1, c] + [1] * (xs.dim() - 2)
    y = ((xs - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape))
    y = y * weight.double().reshape(shape) + bias.double().reshape(shape)
    if mask is not None:
        y = torch.where(mask.unsqueeze(1), y, 0.0)
    new_mu = mu.double() + momentum * (mu_b.detach() - mu.double())
    new_sigma = sigma + momentum * (sigma_b.detach() - sigma)
    return y.movedim(1, axis), new_mu, new_sigma**2 - eps


def _layer(c=3, **kw):
    kw.setdefault("warmup", (0, 0, 0))
    m = normkit.BatchRenorm2d(c, **kw).double()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, c))
        m.bias.copy_(torch.linspace(-0.3, 0.3, c))
    return m


@pytest.mark.parametrize("r_max, d_max", [(1.5, 0.5), (3.0, 5.0), (1.0, 0.0)])
def test_training_matches_the_paper(r_max, d_max, backend):
    m = _layer(r_max=r_max, d_max=d_max, momentum=0.2)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        m.running_var.copy_(torch.tensor([0.3, 4.0, 1.0]))
    for step in range(4):  # the clipping binds: the batches are far from the running statistics
        x = (torch.randn(4, 3, 5, 2, dtype=DOUBLE) * (1 + step) + step).requires_grad_()
        mu, var = m.running_mean.clone(), m.running_var.clone()
        y = m(x)
        xr = x.detach().clone().requires_grad_()
        w, b = (p.detach().clone().requires_grad_() for p in (m.weight, m.bias))
        want, new_mu, new_var = _reference(xr, w, b, mu, var, r_max, d_max, m.eps, 0.2)
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, m.weight, m.bias], g)
        for a, e in zip(got, torch.autograd.grad(want, [xr, w, b], g)):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(m.running_mean, new_mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, new_var, rtol=1e-12, atol=1e-12)
    m.eval()
    x = torch.randn(2, 3, 4, 4, dtype=DOUBLE)
    bn = normkit.BatchNorm2d(3).double().eval()
    bn.load_state_dict(m.state_dict(), strict=False)
    torch.testing.assert_close(m(x), bn(x), rtol=0, atol=0)


def test_no_clipping_room_is_batch_norm_exactly(backend):
    """r_max = 1, d_max = 0 (also the paper's first warm-up steps): outputs and gradients are
    normkit BN's, bit for bit, and torch's to rounding."""
    torch.manual_seed(0)
    brn = normkit.BatchRenorm2d(4, r_max=1.0, d_max=0.0)
    bn, torch_bn = normkit.BatchNorm2d(4), nn.BatchNorm2d(4)
    with torch.no_grad():
        for layer in (brn, bn, torch_bn):
            layer.weight.copy_(torch.linspace(0.5, 2, 4))
            layer.bias.copy_(torch.linspace(-1, 1, 4))
    for _ in range(3):
        x = (torch.randn(6, 4, 5, 5) * 3 + 2).requires_grad_()
        outs = [layer(x) for layer in (brn, bn, torch_bn)]
        g = torch.randn_like(outs[0])
        grads = [torch.autograd.grad(y, [x, layer.weight, layer.bias], g)
                 for y, layer in zip(outs, (brn, bn, torch_bn))]
        assert torch.equal(outs[0], outs[1])
        for a, b in zip(grads[0], grads[1]):
            assert torch.equal(a, b)
        torch.testing.assert_close(outs[0], outs[2])
    assert int(normkit.BatchRenorm2d(4).renorm_step) == 0  # default: the paper's warm-up, rmax 1
    assert float(normkit.BatchRenorm2d(4).renorm_rmax) == 1.0


def test_runs_its_own_fused_operator():
    """BRN has its own spec type: the CPU kernel set, written for it, runs it as the fused
    operator (r and d computed between the moments and the apply: one call, one read of x);
    a kernel set written for batch norm alone does not take it."""
    if normkit.kernels.load("cpu") is None:
        pytest.skip("the C kernels are not built on this machine")
    spec = normkit._core.RenormSpec(("bn",), 1e-5, r_max=3.0, d_max=5.0)
    assert spec.codes == normkit._core.MixSpec(("bn",), 1e-5).codes and spec != normkit._core.MixSpec(("bn",), 1e-5)
    assert normkit.kernels.select(torch.zeros(1)).runs_layer(spec)
    assert not normkit.kernels.select(torch.zeros(1))._replace(layer_specs=(normkit._core.MixSpec,)).runs_layer(spec)
    m = normkit.BatchRenorm2d(4, warmup=(0, 0, 0))
    with normkit.use_backend("cpu"):
        y = m(torch.randn(4, 4, 3, 3))
    assert "_LayerFunction" in type(y.grad_fn).__name__
    with pytest.raises(ValueError, match=r"RenormSpec is batch norm in training: sources \('bn',\)"):
        normkit._core.RenormSpec(("in", "bn"), 1e-5)


def test_operator_renorm_opcheck_and_validation():
    """The renorm arguments of the operators: opcheck (schema, fake, autograd registration) and
    the refusals that keep the C mixer to the spec it was written for."""
    if normkit.kernels.load("cpu") is None:
        pytest.skip("the C kernels are not built on this machine")
    op = torch.ops.normkit
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    rm, rv = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 4.0, 1.0])
    args = (x, w, b, None, None, rm, rv, [2], [1], 0, 1e-5, 1, [1.5, 0.5])
    torch.library.opcheck(op.layer_forward.default, args)
    y, stats = op.layer_forward(*args)
    assert stats.shape == (4 * 4 * 3 + 5 * 3,)
    r, d = stats[-6:-3], stats[-3:]
    assert float(r.min()) >= 1 / 1.5 and float(r.max()) <= 1.5 and float(d.abs().max()) <= 0.5
    dy = torch.randn_like(y)
    back = (dy, x.detach(), stats, w.detach(), None, None, None, None, [2], [1], 0, 1e-5, 1, [True] * 3 + [False] * 2,
            [1.5, 0.5])
    torch.library.opcheck(op.layer_backward.default, back)
    torch.library.opcheck(op.update_running_.default, (rm.clone(), rv.clone(), stats.detach(), 4, 3, 5, 3, 0.1, 1e-5))
    with pytest.raises(ValueError, match=r"renorm needs the one batch-statistics source kind 2 \(bn\), got kinds \[0\]"):
        op.layer_forward(x, w, b, None, None, rm, rv, [0], [1], 0, 1e-5, 1, [1.5, 0.5])
    with pytest.raises(ValueError, match=r"renorm must be \[r_max >= 1, d_max >= 0\], both finite, got \[0.5, 0.0\]"):
        op.layer_forward(x, w, b, None, None, rm, rv, [2], [1], 0, 1e-5, 1, [0.5, 0.0])
    with pytest.raises(ValueError, match="running_mean and running_var are required when a source reads running"):
        op.layer_forward(x, w, b, None, None, None, None, [2], [1], 0, 1e-5, 1, [1.5, 0.5])
    with pytest.raises(ValueError, match=r"stats must be a contiguous CPU torch.float32 tensor of shape \(63,\)"):
        op.update_running_(rm.clone(), rv.clone(), stats.detach()[:-6], 4, 3, 5, 3, 0.1, 1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_operator_equals_the_reference_path(channels_last):
    """The C mixer's r, d, output, gradients and the paper's running update against the
    reference path's, in float32 with the clipping binding, over several steps."""
    torch.manual_seed(0)
    layers = {}
    for name in ("reference", "auto"):
        m = normkit.BatchRenorm2d(3, warmup=(0, 0, 0), r_max=1.5, d_max=0.5, momentum=0.2)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, 3))
            m.bias.copy_(torch.linspace(-0.3, 0.3, 3))
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([0.3, 4.0, 1.0]))
        layers[name] = m
    for step in range(3):
        x = torch.randn(4, 3, 5, 6) * (1 + step) + step
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        got = {}
        for name, m in layers.items():
            xi = x.clone().requires_grad_()
            with normkit.use_backend(name):
                y = m(xi)
            got[name] = (y, *torch.autograd.grad(y, [xi, m.weight, m.bias], g))
        for a, e in zip(got["auto"], got["reference"]):
            torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(layers["auto"], key), getattr(layers["reference"], key),
                                       rtol=1e-6, atol=1e-6)


def test_compiles_to_the_fused_operator():
    """Under torch.compile a training step of BRN keeps ``normkit::layer_forward`` with its
    renorm arguments and moves the running statistics as in eager mode. (The warm-up reads the
    step count in Python: one graph break per call, so not ``fullgraph``.)"""
    if normkit.kernels.load("cpu") is None:
        pytest.skip("the C kernels are not built on this machine")
    torch.manual_seed(0)
    eager, compiled = (normkit.BatchRenorm2d(3, warmup=(0, 0, 0), momentum=0.3) for _ in range(2))
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fn = torch.compile(compiled, backend=backend)
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        torch.testing.assert_close(fn(x), eager(x), rtol=1e-6, atol=1e-6)
    assert any("normkit.layer_forward" in t for t in seen) and any("update_running_" in t for t in seen)
    torch.testing.assert_close(compiled.running_var, eager.running_var, rtol=1e-6, atol=1e-6)


def test_warmup_schedule_and_resume():
    m = normkit.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup=(10, 50, 30))
    x = torch.randn(8, 2)
    seen = {}
    for step in range(1, 61):
        m(x)
        seen[step] = (float(m.renorm_rmax), float(m.renorm_dmax))
    assert seen[10] == (1.0, 0.0)
    assert seen[30] == pytest.approx((1 + 2 * 20 / 40, 5.0))
    assert seen[50] == seen[60] == (3.0, 5.0)
    resumed = normkit.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup=(10, 50, 30))
    first = normkit.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup=(10, 50, 30))
    for _ in range(20):
        first(x)
    resumed.load_state_dict(first.state_dict())
    resumed(x)
    assert int(resumed.renorm_step) == 21 and (float(resumed.renorm_rmax), float(resumed.renorm_dmax)) == seen[21]
    with torch.no_grad():
        resumed(x)
    resumed.eval()
    resumed(x)
    assert int(resumed.renorm_step) == 21
    custom = normkit.BatchRenorm1d(2, clip_schedule=lambda step: (1.0 + step, 0.5 * step))
    custom(x)
    custom(x)
    assert (float(custom.renorm_rmax), float(custom.renorm_dmax)) == (3.0, 1.0)
    custom.reset_running_stats()
    assert int(custom.renorm_step) == 0 and float(custom.renorm_rmax) == 1.0


@pytest.mark.parametrize("axis", [1, -1])
def test_masked_and_channels_last(axis, backend):
    torch.manual_seed(3)
    m = normkit.BatchRenorm1d(3, warmup=(0, 0, 0), r_max=1.5, d_max=0.5, axis=axis, momentum=0.3).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -1.0, 0.0]))
    x = torch.randn(4, 3, 6, dtype=DOUBLE) * 2
    mask = torch.rand(4, 6) < 0.6
    mask[0] = False
    xl = (x if axis == 1 else x.movedim(1, -1).contiguous()).clone().requires_grad_()
    mu, var = m.running_mean.clone(), m.running_var.clone()
    y = m(xl, mask)
    want, new_mu, new_var = _reference(x, m.weight, m.bias, mu, var, 1.5, 0.5, m.eps, 0.3, 1, mask)
    want = want if axis == 1 else want.movedim(1, -1)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.running_mean, new_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, new_var, rtol=1e-12, atol=1e-12)
    padded = ~(mask.unsqueeze(1) if axis == 1 else mask.unsqueeze(-1)).expand_as(y)
    assert torch.all(y[padded] == 0)
    assert torch.all(torch.autograd.grad(y.sum(), xl)[0][padded] == 0)
    # channels_last memory format: same numbers as contiguous
    m2 = _layer(3, r_max=1.5, d_max=0.5)
    twin = _layer(3, r_max=1.5, d_max=0.5)
    x4 = torch.randn(3, 3, 4, 5, dtype=DOUBLE) + 1
    torch.testing.assert_close(m2(x4.contiguous(memory_format=torch.channels_last)), twin(x4), rtol=1e-12, atol=1e-12)


def test_warmup_bounds_follow_every_change_of_the_buffers():
    """The layer remembers the step and bounds it wrote; a load_state_dict, reset, fill_,
    reassignment, deepcopy or pickle of the buffers is seen, and the bounds are always the
    schedule's at the current step."""
    import copy
    import pickle

    def check(m):
        assert (float(m.renorm_rmax), float(m.renorm_dmax)) == m._clip_at(int(m.renorm_step))

    m = normkit.BatchRenorm2d(3, warmup=(2, 6, 4))
    x = torch.randn(4, 3, 2, 2)
    for _ in range(3):
        m(x)
        check(m)
    saved = copy.deepcopy(m.state_dict())
    for _ in range(3):
        m(x)
    m.load_state_dict(saved)
    m(x)
    assert int(m.renorm_step) == 4
    check(m)
    m.renorm_rmax.fill_(9.0)
    m(x)
    check(m)
    m.renorm_step = torch.tensor(0)
    m(x)
    assert int(m.renorm_step) == 1
    check(m)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        clone(x)
        assert int(clone.renorm_step) == 2
        check(clone)
    m.reset_running_stats()
    m(x)
    assert int(m.renorm_step) == 1
    check(m)


def test_gradcheck_with_active_correction():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 3, dtype=DOUBLE, requires_grad=True)
    w = torch.rand(3, dtype=DOUBLE, requires_grad=True)
    b = torch.randn(3, dtype=DOUBLE, requires_grad=True)
    # far from the batch, so r and d are clipped: constants by value too, and finite differences
    # (which would otherwise see them move) measure the gradient the layer defines
    rm, rv = torch.tensor([10.0, -10.0, 8.0], dtype=DOUBLE), torch.tensor([100.0, 50.0, 80.0], dtype=DOUBLE)

    def fn(x, w, b):  # fresh running statistics each call: gradcheck evaluates many times
        return F.batch_renorm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 1.2, 0.3)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_degenerate_shapes_and_errors():
    m = normkit.BatchRenorm2d(3, warmup=(0, 0, 0))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size \[1, 3, 1, 1\]"):
        m(torch.randn(1, 3, 1, 1))
    m.eval()
    assert m(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)
    y = normkit.BatchRenorm2d(3, warmup=(0, 0, 0))(torch.randn(2, 3, 1, 1))  # N = 2, L = 1: no NaN
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match=r"r_max must be a finite number >= 1 \(r is clipped to \[1/r_max, r_max\]\), got 0\.5"):
        normkit.BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be a finite number >= 0 \(d is clipped to \[-d_max, d_max\]\), got -1"):
        F.batch_renorm(torch.randn(2, 3), torch.zeros(3), torch.ones(3), training=True, d_max=-1)
    with pytest.raises(ValueError, match=r"warmup must be \(start, r_max_at, d_max_at\).*got \(10, 5, 20\)"):
        normkit.BatchRenorm2d(3, warmup=(10, 5, 20))
    with pytest.raises(ValueError, match=r"clip_schedule must be a callable step -> \(r_max, d_max\) or None, got 1"):
        normkit.BatchRenorm2d(3, clip_schedule=1)
    with pytest.raises(ValueError, match=r"clip_schedule\(0\) must return \(r_max, d_max\), got 2\.0"):
        normkit.BatchRenorm2d(3, clip_schedule=lambda step: 2.0)
    late = normkit.BatchRenorm2d(3, clip_schedule=lambda step: (1.0, 0.0) if step == 0 else (0.5, 0.0))
    with pytest.raises(ValueError, match=r"r_max must be a finite number >= 1 .*got 0\.5"):
        late(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"running_mean and running_var must be given together"):
        F.batch_renorm(torch.randn(2, 3), torch.zeros(3), None, training=True)
    untracked = normkit.BatchRenorm2d(3, track_running_stats=False).eval()  # batch statistics in eval too
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(untracked(x), nn.functional.batch_norm(x, None, None, untracked.weight,
                                                                      untracked.bias, True))


def test_not_a_torch_batch_norm_and_tools():
    assert not isinstance(normkit.BatchRenorm2d(3), nn.modules.batchnorm._BatchNorm)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), normkit.BatchRenorm2d(3))
    assert isinstance(nn.SyncBatchNorm.convert_sync_batchnorm(net)[1], normkit.BatchRenorm2d)
    # convert from and to batch norm carries the statistics
    torch.manual_seed(0)
    bn_net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    bn_net(torch.randn(4, 2, 3, 3))
    stats = bn_net[1].running_mean.clone()
    normkit.convert(bn_net, "brn", r_max=2.0)
    assert isinstance(bn_net[1], normkit.BatchRenorm2d) and bn_net[1].r_max == 2.0
    assert torch.equal(bn_net[1].running_mean, stats)
    normkit.convert(bn_net, "batch")
    assert type(bn_net[1]) is normkit.BatchNorm2d and torch.equal(bn_net[1].running_mean, stats)
    assert isinstance(normkit.create_norm("brn", 4, dim=3), normkit.BatchRenorm3d)
    # recompute_stats sets the population statistics and takes no warm-up step
    net = nn.Sequential(nn.Conv2d(2, 3, 1), normkit.BatchRenorm2d(3, warmup=(0, 0, 0)))
    batches = [torch.randn(5, 2, 3, 3) * 2 + 1 for _ in range(3)]
    normkit.recompute_stats(net, batches)
    with torch.no_grad():
        out = torch.cat([net[0](b) for b in batches]).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(net[1].running_mean, out.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, out.var(1), rtol=1e-5, atol=1e-5)
    assert int(net[1].renorm_step) == 0
    # frozen: running statistics, no update, in training too
    normkit.freeze_stats(net)
    before = net[1].running_mean.clone()
    net.train()(torch.randn(4, 2, 3, 3))
    assert torch.equal(net[1].running_mean, before)
    normkit.unfreeze_stats(net)
    # eval BRN is an affine map per channel: it fuses into the conv
    net.eval()
    x = torch.randn(2, 2, 3, 3)
    want = net(x)
    normkit.fuse(net)
    assert not any(isinstance(m, normkit.BatchRenorm2d) for m in net.modules())
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
    # sync: convert(model, "sync") gives BRN a process group like any batch-statistics layer
    group = object()
    synced = normkit.convert(nn.Sequential(normkit.BatchRenorm2d(3)), "sync", process_group=group)
    assert synced[0].process_group is group


_KERAS_SCRIPT = textwrap.dedent("""
    import sys, torch, keras
    data = torch.load(sys.argv[1])
    eps, alpha, r_max, d_max = data["eps"], data["momentum"], data["r_max"], data["d_max"]
    layer = keras.layers.BatchNormalization(
        axis=-1, momentum=1 - alpha, epsilon=eps, renorm=True, renorm_momentum=1 - alpha,
        renorm_clipping={"rmax": r_max, "rmin": 1 / r_max, "dmax": d_max})
    layer.build(data["xs"][0].shape)
    layer.gamma.assign(data["gamma"])
    layer.beta.assign(data["beta"])
    outs, grads = [], []
    for x in data["xs"]:
        x = x.clone().requires_grad_()
        y = layer(x, training=True)
        outs.append(y.detach().clone())
        grads.append(torch.autograd.grad((y * data["probe"]).sum(), x)[0])
    result = {"outs": outs, "grads": grads, "eval": layer(data["xs"][0], training=False).detach().clone(),
              "moving_mean": torch.as_tensor(layer.moving_mean.numpy()),
              "moving_variance": torch.as_tensor(layer.moving_variance.numpy())}
    torch.save(result, sys.argv[2])
""")


def test_matches_keras_renorm(tmp_path):
    """Keras 3 (torch backend, in a subprocess so this process never imports keras) with
    ``momentum = renorm_momentum = 1 - alpha`` and the same clipping, on the same inputs."""
    torch.manual_seed(0)
    c, eps, alpha, r_max, d_max = 4, 1e-3, 0.3, 1.4, 0.6
    xs = [torch.randn(6, 5, 5, c) * (1 + 0.5 * i) + 0.7 * i for i in range(5)]
    gamma, beta = torch.linspace(0.5, 1.5, c), torch.linspace(-0.2, 0.2, c)
    probe = torch.randn(6, 5, 5, c)
    torch.save({"xs": xs, "eps": eps, "momentum": alpha, "r_max": r_max, "d_max": d_max, "gamma": gamma,
                "beta": beta, "probe": probe}, tmp_path / "in.pt")
    script = tmp_path / "keras_renorm.py"
    script.write_text(_KERAS_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND="torch")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    keras_result = torch.load(tmp_path / "out.pt")
    m = normkit.BatchRenorm2d(c, eps=eps, momentum=alpha, axis=-1, r_max=r_max, d_max=d_max, warmup=(0, 0, 0))
    with torch.no_grad():
        m.weight.copy_(gamma)
        m.bias.copy_(beta)
        m.running_var.fill_(1 - eps)  # Keras starts its renorm stddev at 1 = sqrt(running_var + eps)
    for x, want, want_grad in zip(xs, keras_result["outs"], keras_result["grads"]):
        x = x.clone().requires_grad_()
        y = m(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(torch.autograd.grad((y * probe).sum(), x)[0], want_grad, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(m.running_mean, keras_result["moving_mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, keras_result["moving_variance"], rtol=1e-5, atol=1e-6)
    m.eval()
    torch.testing.assert_close(m(xs[0]), keras_result["eval"], rtol=1e-5, atol=2e-5)


def _synced_rank(rank: int, world: int, init: str, out: str) -> None:
    """One rank: BRN (correction active) and SSN (sphere radius) synchronised over gloo on
    its shard of a shared batch; saves outputs, input gradients and running statistics."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        x = torch.randn(6, 3, 4, 4, dtype=DOUBLE) * 2 + 1
        g = torch.randn_like(x)
        shard = slice(rank * 3, rank * 3 + 3)
        results = {}
        for name, layer in _sync_layers(dist.group.WORLD).items():
            xs = x[shard].clone().requires_grad_()
            y = layer(xs)
            (y * g[shard]).sum().backward()
            results[name] = (y.detach(), xs.grad, layer.running_mean.clone(), layer.running_var.clone())
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _sync_layers(group):
    brn = normkit.BatchRenorm2d(3, warmup=(0, 0, 0), r_max=1.3, d_max=0.2, momentum=0.5, process_group=group)
    ssn = normkit.SparseSwitchNorm2d(3, radius=0.45, radius_steps=None, process_group=group)
    with torch.no_grad():
        brn.running_mean.fill_(0.5)
        ssn.mean_logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
        ssn.var_logits.copy_(torch.tensor([-0.1, 0.2, 0.4]))
    return {"brn": brn.double(), "ssn": ssn.double()}


def test_synchronised_across_two_processes(tmp_path):
    """Two gloo ranks with equal shards equal one process on the whole batch."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.start_processes(_synced_rank, args=(2, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=DOUBLE) * 2 + 1
    g = torch.randn_like(x)
    for name, layer in _sync_layers(None).items():
        xs = x.clone().requires_grad_()
        y = layer(xs)
        (y * g).sum().backward()
        got_y = torch.cat([ranks[r][name][0] for r in range(2)])
        got_dx = torch.cat([ranks[r][name][1] for r in range(2)])
        torch.testing.assert_close(got_y, y.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_dx, xs.grad, rtol=1e-9, atol=1e-9)
        for r in range(2):
            torch.testing.assert_close(ranks[r][name][2], layer.running_mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ranks[r][name][3], layer.running_var, rtol=1e-12, atol=1e-12)
