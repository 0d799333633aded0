"""Weight Standardization: the effective weight is standardised and gradients flow through it
(the seed 004 mistake, WS passed as a kernel_regularizer, standardises nothing)."""

import pytest
import torch
from torch import nn

import normkit


def _reference(w, eps):
    """Float64 WS from the definition: per output filter, biased std, eps inside the sqrt."""
    flat = w.double().reshape(w.shape[0], -1)
    mean = flat.sum(1, keepdim=True) / flat.shape[1]
    var = ((flat - mean) ** 2).sum(1, keepdim=True) / flat.shape[1]
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape)


@pytest.mark.parametrize("module", [nn.Conv1d(3, 5, 3), nn.Conv2d(4, 6, 3, groups=2), nn.Conv3d(2, 4, 2), nn.Linear(7, 3)])
def test_effective_weight_is_standardised_per_filter(module):
    module = module.double()
    with torch.no_grad():
        module.weight.mul_(0.1).add_(0.3)  # far from standardised: mean 0.3, std ~ 0.03
    raw = module.weight.detach().clone()
    normkit.weight_standardization(module, eps=1e-12)
    w = module.weight.reshape(module.weight.shape[0], -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(w.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(w.std(1, unbiased=False), torch.ones(w.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(module.weight, _reference(raw, 1e-12))
    assert torch.equal(module.parametrizations.weight.original, raw)


def test_forward_uses_standardised_weight_and_gradients_flow_through_it():
    conv = nn.Conv2d(3, 4, 3).double()
    raw = conv.weight.detach().clone().requires_grad_(True)
    normkit.weight_standardization(conv)  # default eps 1e-6
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    loss = ((conv(x) - target) ** 2).sum()
    loss.backward()
    expected_loss = ((torch.nn.functional.conv2d(x, _reference(raw, 1e-6), conv.bias.detach()) - target) ** 2).sum()
    torch.testing.assert_close(loss, expected_loss)
    expected_loss.backward()
    grad = conv.parametrizations.weight.original.grad
    torch.testing.assert_close(grad, raw.grad)
    # through the standardisation: shifting a filter changes nothing, so its gradient sums to 0
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad.reshape(4, -1).sum(1), torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)
    # a regulariser-style WS (seed 004) would leave the forward on the raw weight: not here
    plain = ((torch.nn.functional.conv2d(x, raw.detach(), conv.bias.detach()) - target) ** 2).sum()
    assert not torch.allclose(loss, plain)


def test_gain_and_wsconv2d():
    conv = normkit.WSConv2d(3, 4, 3, padding=1, gain=True, eps=1e-8).double()
    assert isinstance(conv, normkit.WSConv2d) and isinstance(conv, nn.Conv2d)
    gain = conv.parametrizations.weight[0].gain
    assert gain.shape == (4, 1, 1, 1)
    with torch.no_grad():
        gain.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]).reshape(4, 1, 1, 1))
    std = conv.weight.reshape(4, -1).std(1, unbiased=False)
    torch.testing.assert_close(std, torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64), atol=0, rtol=1e-5)
    conv(torch.randn(1, 3, 5, 5, dtype=torch.float64)).sum().backward()
    assert gain.grad is not None and gain.grad.abs().sum() > 0
    assert any(p is gain for p in conv.parameters())


def test_errors():
    with pytest.raises(TypeError, match="expects a torch.nn.Conv1d, Conv2d, Conv3d or Linear, got ConvTranspose2d"):
        normkit.weight_standardization(nn.ConvTranspose2d(2, 2, 3))
    with pytest.raises(TypeError, match="got BatchNorm2d"):
        normkit.weight_standardization(nn.BatchNorm2d(2))
    conv = normkit.weight_standardization(nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="already standardised"):
        normkit.weight_standardization(conv)
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        normkit.weight_standardization(nn.Linear(2, 2), eps=0)
