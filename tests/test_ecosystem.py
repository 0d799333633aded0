"""normkit layers with the rest of PyTorch: compile, export, autocast, channels_last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
import reference as ref
from common_layers import variant, variants


def _net(norm) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


@pytest.mark.slow
@pytest.mark.parametrize("norm", [lambda c, k=k: variant(k).build(c, 2) for k in ("sn", "bn")], ids=["sn", "bn"])
def test_compile_fullgraph_train_and_eval(norm):
    torch._dynamo.reset()
    model = _net(norm)
    eager = _net(norm)
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 6, 6)
    for training in (True, False):
        model.train(training)
        eager.train(training)
        y, y_eager = compiled(x), eager(x)  # one forward each: train mode moves running stats
        torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
        if training:
            y.square().mean().backward()
            y_eager.square().mean().backward()
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_export_eval():
    model = _net(normkit.SwitchNorm2d).eval()
    x = torch.randn(2, 3, 5, 5)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_autocast_bfloat16_cpu():
    model = _net(normkit.SwitchNorm2d)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    sn = model[1]
    assert sn.running_mean.dtype == torch.float32 and torch.isfinite(sn.running_var).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# every configuration of the table as a 2-D layer, and torch's default instance norm (no affine)
_CHANNELS_LAST = [(v.variant, v, {}) for v in variants(channels_axis=True)]
_CHANNELS_LAST.append(("in-no-affine", variant("in-affine"), {"affine": False}))


@pytest.mark.parametrize("case,kw", [r[1:] for r in _CHANNELS_LAST], ids=[r[0] for r in _CHANNELS_LAST])
def test_channels_last_input(case, kw, backend):
    c = case.channels(4)
    norm = lambda c: case.build(c, 2, **kw)
    m = norm(c).double()
    x = torch.randn(3, c, 5, 6, dtype=torch.float64)
    xl = x.to(memory_format=torch.channels_last).requires_grad_()
    xc = x.clone().requires_grad_()
    y = m(xl)
    m2 = norm(c).double()
    torch.testing.assert_close(y, m2(xc), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, xl, g)[0], torch.autograd.grad(m2(xc), xc, g)[0], rtol=1e-10, atol=1e-10
    )


def test_half_input_float32_statistics(backend):
    m = normkit.SwitchNorm2d(4)
    x = torch.randn(4, 4, 8, 8) * 3 + 100
    y = m(x.half())
    assert y.dtype == torch.float16
    expected = ref.switch_norm(x.half(), ("in", "ln", "bn"))
    assert (y.double() - expected).abs().max() < 2e-2
    assert m.running_mean.dtype == torch.float32


def test_module_in_half_precision_keeps_working():
    m = normkit.BatchNorm2d(4).half()
    y = m(torch.randn(4, 4, 3, 3).half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and m.running_var.dtype == torch.float16


def test_drop_in_replacement_trains():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), normkit.SwitchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    x = torch.randn(32, 1, 6, 6)
    target = (x.mean((1, 2, 3)) > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model[1].mean_logits.grad is not None and model[1].mean_logits.grad.abs().sum() > 0


class _Doubled(nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("case", variants() + [c for c in __import__("common_layers").LAYER_NORM_CASES], ids=str)
def test_parametrized_parameters_are_used(case, backend):
    """Layers read their parameters from the module's registries (fast); a parameter that
    torch.nn.utils.parametrize moved out of them is read through its property."""
    torch.manual_seed(0)
    layer = case.make().double()
    plain = case.make().double()
    plain.load_state_dict(layer.state_dict())
    names = [n for n in ("weight", "mean_logits") if getattr(layer, n, None) is not None]
    if not names:
        pytest.skip("no parameter to parametrize")
    for name in names:
        nn.utils.parametrize.register_parametrization(layer, name, _Doubled())
        with torch.no_grad():
            getattr(plain, name).mul_(2)
    x = torch.randn(case.shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), plain(x))
    layer(x).sum().backward()
    assert layer.parametrizations[names[0]].original.grad is not None
