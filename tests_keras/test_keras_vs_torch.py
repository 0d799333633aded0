"""The Keras layer equals normkit's torch SwitchNorm2d on the same weights, conventions converted.

Conversions: NHWC -> NCHW; torch momentum = 1 - Keras momentum; the same epsilon; Keras'
moving variance is biased, torch's running variance unbiased (factor n / (n - 1)).
"""

import numpy as np
import pytest
import torch

from keras_helpers import to_numpy
import normkit
from normkit.keras import SwitchNormalization


@pytest.mark.parametrize("sources", [("in", "ln", "bn"), ("in", "ln", "bn", "gn2")])
def test_matches_torch_switchnorm2d(sources):
    rng = np.random.RandomState(0)
    n, h, w, c = 4, 5, 6, 8
    x = (rng.randn(n, h, w, c) * 2 + 1).astype("float32")
    mean_logits = rng.randn(len(sources)).astype("float32")
    var_logits = rng.randn(len(sources)).astype("float32")
    gamma, beta = rng.rand(c).astype("float32") + 0.5, rng.randn(c).astype("float32")

    layer = SwitchNormalization(momentum=0.9, epsilon=1e-3, sources=sources)
    layer.build(x.shape)
    for variable, value in ((layer.mean_logits, mean_logits), (layer.var_logits, var_logits),
                            (layer.gamma, gamma), (layer.beta, beta)):
        variable.assign(value)
    module = normkit.SwitchNorm2d(c, eps=1e-3, momentum=1 - 0.9, sources=sources)
    with torch.no_grad():
        module.mean_logits.copy_(torch.from_numpy(mean_logits))
        module.var_logits.copy_(torch.from_numpy(var_logits))
        module.weight.copy_(torch.from_numpy(gamma))
        module.bias.copy_(torch.from_numpy(beta))
    x_nchw = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    keras_out = to_numpy(layer(x, training=True))
    torch_out = module.train()(x_nchw).detach().permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(keras_out, torch_out, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), module.running_mean.numpy(), atol=1e-6)
    values = n * h * w
    unbiased = (to_numpy(layer.moving_variance) - 0.9) * values / (values - 1) + 0.9  # start value 1
    np.testing.assert_allclose(unbiased, module.running_var.numpy(), rtol=1e-5)

    with torch.no_grad():  # inference: the same moving statistics on both sides
        module.running_var.copy_(torch.from_numpy(to_numpy(layer.moving_variance)))
    keras_eval = to_numpy(layer(x, training=False))
    torch_eval = module.eval()(x_nchw).detach().permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(keras_eval, torch_eval, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.mean_weights), module.mean_weights.detach().numpy(), rtol=1e-6)
