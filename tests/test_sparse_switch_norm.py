"""Sparse Switchable Normalization: its radius schedule, its equivalences with IN / LN / BN
and SN, masks against the float64 reference, and the tools (harden, fuse, convert, stats,
importance) on a network that trains until every layer is one-hot."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import normkit
import reference as ref

DOUBLE = torch.float64


def _ssn(c=4, **kw):
    kw.setdefault("radius_steps", None)
    return normkit.SparseSwitchNorm2d(c, **kw).double()


# ---- radius schedule ------------------------------------------------------------------------

def test_linear_schedule_reaches_one_hot_radius_and_stays():
    m = normkit.SparseSwitchNorm2d(3, radius_steps=50)
    x = torch.randn(4, 3, 2, 2)
    radii = []
    for _ in range(60):
        m(x)
        radii.append(float(m.radius))
    assert radii[:3] == pytest.approx([0.0, 1 / 50, 2 / 50])  # step t takes r = t / T, t from 0
    assert radii[-1] == m.max_radius == pytest.approx(math.sqrt(2 / 3))
    assert int(m.radius_step) == 60
    assert torch.equal(m.mean_weights, torch.tensor([1.0, 0.0, 0.0], dtype=DOUBLE))  # equal logits: first source


def test_schedule_state_resumes_from_a_checkpoint():
    torch.manual_seed(1)
    xs = [torch.randn(4, 3, 2, 2) for _ in range(40)]
    straight = normkit.SparseSwitchNorm2d(3, radius_steps=30)
    for x in xs:
        straight(x)
    first = normkit.SparseSwitchNorm2d(3, radius_steps=30)
    for x in xs[:15]:
        first(x)
    resumed = normkit.SparseSwitchNorm2d(3, radius_steps=30)
    resumed.load_state_dict(first.state_dict())
    for x in xs[15:]:
        resumed(x)
    assert int(resumed.radius_step) == int(straight.radius_step) == 40
    assert float(resumed.radius) == float(straight.radius)


def test_callable_schedule_and_fixed_radius():
    m = normkit.SparseSwitchNorm2d(3, radius_schedule=lambda step: 0.1 * step)
    x = torch.randn(2, 3, 2, 2)
    m(x)
    m(x)
    assert float(m.radius) == pytest.approx(0.1)  # the second step: schedule(1)
    for _ in range(20):
        m(x)
    assert float(m.radius) == pytest.approx(m.max_radius)  # clipped
    fixed = normkit.SparseSwitchNorm2d(3, radius=0.3, radius_steps=None)
    fixed(x)
    assert float(fixed.radius) == pytest.approx(0.3) and int(fixed.radius_step) == 1
    fixed.set_radius(0.5)
    assert float(fixed.radius) == pytest.approx(0.5)


def _tiny_net(seed, steps):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), normkit.SparseSwitchNorm2d(6, radius_steps=steps), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), normkit.SparseSwitchNorm2d(6, radius_steps=steps), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_logits_learn_from_their_equal_start(seed):
    """The first step is sparsemax, so the equal initial logits get a gradient and leave the
    tie; at an exact tie with r > 0 the weights are locally constant and the logits would stay
    equal (the weights then only follow the radius towards the first source)."""
    net = _tiny_net(seed, steps=1000)
    layers = [net[1], net[4]]
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    data = torch.randn(16, 3, 6, 6)
    target = (data.mean((1, 2, 3)) > 0).long()
    for i in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(net(data), target).backward()
        if i == 0:
            assert all(float(m.mean_logits.grad.abs().max()) > 0 and float(m.var_logits.grad.abs().max()) > 0
                       for m in layers)
        opt.step()
    for m in layers:
        for logits in (m.mean_logits, m.var_logits):
            assert len(set(logits.tolist())) == 3, logits  # no two equal
    # what the tie point would give at this radius: the first source ahead, the others equal
    r = float(layers[0].radius)
    tie = torch.tensor([1 / 3 + r * math.sqrt(2 / 3), 1 / 3 - r / math.sqrt(6), 1 / 3 - r / math.sqrt(6)], dtype=DOUBLE)
    assert all(not torch.allclose(m.mean_weights.detach(), tie, atol=1e-6) for m in layers)
    assert not torch.equal(layers[0].mean_weights, layers[1].mean_weights)


def test_equal_logits_at_a_fixed_radius_are_stuck_at_the_tie_point():
    """The documented trap of a fixed radius > 0 from the start: zero gradient at the tie."""
    m = normkit.SparseSwitchNorm2d(3, radius=0.3, radius_steps=None)
    x = torch.randn(4, 3, 3, 3)
    m(x).pow(2).mul(torch.randn(4, 3, 3, 3)).sum().backward()
    assert torch.equal(m.mean_logits.grad, torch.zeros(3)) and torch.equal(m.var_logits.grad, torch.zeros(3))


def test_eval_and_no_grad_are_not_training_steps():
    m = normkit.SparseSwitchNorm2d(3, radius_steps=10)
    x = torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        m(x)
    m.eval()
    m(x)
    assert int(m.radius_step) == 0 and float(m.radius) == 0.0
    net = nn.Sequential(nn.Conv2d(2, 3, 1), normkit.SparseSwitchNorm2d(3, radius_steps=10))
    normkit.recompute_stats(net, [torch.randn(2, 2, 3, 3) for _ in range(3)])
    assert int(net[1].radius_step) == 0


def test_errors():
    with pytest.raises(ValueError, match=r"radius_steps must be a positive int \(training steps\) or None, got 0"):
        normkit.SparseSwitchNorm2d(3, radius_steps=0)
    with pytest.raises(ValueError, match=r"radius_schedule must be a callable step -> radius or None, got 3"):
        normkit.SparseSwitchNorm2d(3, radius_schedule=3)
    with pytest.raises(ValueError, match=r"radius must be a finite number >= 0, got -1"):
        normkit.SparseSwitchNorm2d(3, radius=-1)
    m = normkit.SparseSwitchNorm2d(3, radius_schedule=lambda step: -0.5)
    with pytest.raises(ValueError, match=r"radius_schedule\(step\) must be a finite number >= 0, got -0\.5"):
        m(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"radius must be a finite number >= 0, got nan"):
        normkit.SparseSwitchNorm2d(3).set_radius(float("nan"))


# ---- equivalences ---------------------------------------------------------------------------

_PLAIN = {
    "in": lambda c: normkit.InstanceNorm2d(c, affine=True),
    "ln": lambda c: normkit.GroupNorm(1, c),
    "bn": lambda c: normkit.BatchNorm2d(c),
}


@pytest.mark.parametrize("source", ["in", "ln", "bn"])
@pytest.mark.parametrize("training", [True, False])
def test_one_hot_ssn_equals_the_plain_layer(source, training, backend):
    c = 4
    ssn = _ssn(c, radius=1.0)
    plain = _PLAIN[source](c).double()
    with torch.no_grad():
        ssn.mean_logits.copy_(torch.tensor([0.0, 0.5, 0.2], dtype=DOUBLE))
        ssn.mean_logits[["in", "ln", "bn"].index(source)] = 2.0
        ssn.var_logits.copy_(ssn.mean_logits * 0.7)
        for layer in (ssn, plain):
            layer.weight.copy_(torch.linspace(0.5, 1.5, c))
            layer.bias.copy_(torch.linspace(-1, 1, c))
            if source == "bn":
                layer.running_mean.copy_(torch.linspace(-0.5, 0.5, c))
                layer.running_var.copy_(torch.linspace(0.5, 2.0, c))
    assert ssn.mean_weights.max() == 1.0 and ssn.var_weights.max() == 1.0
    ssn.train(training)
    plain.train(training)
    x = torch.randn(5, c, 3, 4, dtype=DOUBLE, requires_grad=True)
    y_ssn, y_plain = ssn(x), plain(x)
    torch.testing.assert_close(y_ssn, y_plain, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_ssn)
    torch.testing.assert_close(torch.autograd.grad(y_ssn, x, g)[0], torch.autograd.grad(y_plain, x, g)[0],
                               rtol=1e-10, atol=1e-10)


def test_zero_radius_with_equal_logits_equals_sn(backend):
    ssn, sn = _ssn(6, radius=0.0), normkit.SwitchNorm2d(6).double()
    sn.load_state_dict({k: v for k, v in ssn.state_dict().items() if k not in ("radius", "radius_step")})
    torch.testing.assert_close(ssn.mean_weights, sn.mean_weights.double(), rtol=0, atol=0)
    x = torch.randn(3, 6, 4, 4, dtype=DOUBLE, requires_grad=True)
    y_ssn, y_sn = ssn(x), sn(x)
    torch.testing.assert_close(y_ssn, y_sn, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(y_sn)
    torch.testing.assert_close(torch.autograd.grad(y_ssn, x, g)[0], torch.autograd.grad(y_sn, x, g)[0],
                               rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ssn.running_mean, sn.running_mean, rtol=0, atol=1e-15)


@pytest.mark.parametrize("radius", [0.0, 0.45, 1.0])
@pytest.mark.parametrize("axis", [1, -1])
def test_masked_ssn_equals_the_packed_reference(radius, axis, backend):
    torch.manual_seed(2)
    m = normkit.SparseSwitchNorm1d(4, radius=radius, radius_steps=None, axis=axis).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn(3, 4, 6, dtype=DOUBLE) * 2 + 0.5
    if axis == -1:
        x = x.movedim(1, -1).contiguous()
    mask = torch.rand(3, 6) < 0.7
    mask[1] = False  # a sample with no valid position
    xl = x.clone().requires_grad_()
    y = m(xl, mask)
    xr = x.clone().requires_grad_()
    want = ref.switch_norm(xr, m.sources, m.mean_weights.detach(), m.var_weights.detach(), m.weight.detach(),
                           m.bias.detach(), m.eps, axis, mask=mask)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, xl, g)[0], torch.autograd.grad(want, xr, g)[0],
                               rtol=1e-7, atol=1e-8)


# ---- a network trained until every layer is one-hot, then deployed --------------------------

def _net(steps):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), normkit.create_norm("ssn", 8, radius_steps=steps), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), normkit.create_norm("ssn", 8, radius_steps=steps), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )


def test_training_ends_one_hot_then_harden_and_fuse_change_nothing():
    steps = 40
    net = _net(steps)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    data = torch.randn(16, 3, 6, 6)
    target = (data.mean((1, 2, 3)) > 0).long()
    history = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(data), target).backward()
        opt.step()
        history.append(normkit.importance_report(net))
    for row in history[-1].rows:
        assert sorted(row.mean) == [0.0, 0.0, 1.0] and sorted(row.var) == [0.0, 0.0, 1.0], row
    assert any(0.0 < w < 1.0 for row in history[0].rows for w in row.mean)  # it mixed before
    net.eval()
    x = torch.randn(4, 3, 6, 6)
    # a layer that chose different sources for its means and its variances is computed by no
    # plain layer, so harden leaves it (and the output) as it is
    mixed = sum(row.mean.index(1.0) != row.var.index(1.0) for row in history[-1].rows)
    assert mixed >= 1, history[-1].rows
    before = net(x)
    kept = normkit.harden(copy.deepcopy(net))
    assert sum(isinstance(m, normkit.SparseSwitchNorm2d) for m in kept.modules()) == mixed
    torch.testing.assert_close(kept(x), before, rtol=0, atol=0)
    # a layer whose means and variances chose the same source becomes that plain layer
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, normkit.SparseSwitchNorm2d):
                m.var_logits.copy_(m.mean_logits)
    before = net(x)
    normkit.harden(net)
    assert not any(isinstance(m, normkit.SparseSwitchNorm2d) for m in net.modules())
    torch.testing.assert_close(net(x), before, rtol=0, atol=1e-6)
    normkit.fuse(net)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_harden_waits_for_exact_one_hot():
    ssn = _ssn(4, radius=0.7)
    with torch.no_grad():
        ssn.mean_logits.copy_(torch.tensor([0.0, 0.0, 2.0]))
        ssn.var_logits.copy_(torch.tensor([0.0, 0.0, 2.0]))
    assert ssn.mean_weights.max() == 1.0
    assert isinstance(normkit.harden(ssn), normkit.BatchNorm2d)
    near = _ssn(4, radius=0.0)
    with torch.no_grad():
        near.mean_logits.copy_(torch.tensor([0.0, 0.995, 0.0]))
        near.var_logits.copy_(torch.tensor([0.0, 0.995, 0.0]))
    assert 0.99 < float(near.mean_weights.detach().max()) < 1.0
    assert normkit.harden(near, threshold=0.99) is near  # an SN with these weights would harden


def test_plot_of_weights(tmp_path):
    pytest.importorskip("matplotlib")
    net = _net(10)
    path = normkit.plot_importance(net, tmp_path / "ssn.png", title="SSN importance weights")
    assert (tmp_path / "ssn.png").stat().st_size > 0 and path.endswith("ssn.png")


def test_convert_to_and_from_ssn_carries_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    net(torch.randn(4, 3, 2, 2))
    normkit.convert(net, "ssn", radius_steps=100)
    assert isinstance(net[1], normkit.SparseSwitchNorm2d) and net[1].radius_steps == 100
    assert normkit.nn.registry.kind_of(net[1]).name == "sparse_switch"
    bn_mean = net[1].running_mean.clone()
    normkit.convert(net, "bn")
    assert isinstance(net[1], normkit.BatchNorm2d) and torch.equal(net[1].running_mean, bn_mean)
    assert isinstance(normkit.create_norm("sparse_switch", 8, dim=3), normkit.SparseSwitchNorm3d)


def test_freeze_stats_keeps_running_statistics():
    m = normkit.SparseSwitchNorm2d(3)
    normkit.freeze_stats(m)
    m.train()
    before = m.running_mean.clone()
    m(torch.randn(4, 3, 2, 2) + 5)
    assert torch.equal(m.running_mean, before)
