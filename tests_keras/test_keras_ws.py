"""Weight Standardization: the forward pass uses the standardised kernel; a regularizer cannot."""

import os

import numpy as np
import pytest

import keras
from keras import ops

from keras_helpers import to_numpy
from normkit.keras import WeightStandardization, WSConv1D, WSConv2D, WSConv3D, standardize_kernel


def ws_reg(kernel):
    """Seed 004's "WS": a kernel_regularizer. Keras adds what it returns to the loss, nothing more."""
    mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
    centred = kernel - mean
    standardized = centred / (ops.std(centred, axis=(0, 1, 2), keepdims=True) + 1e-5)
    return 0.0 * ops.sum(standardized)


def _per_filter(kernel):
    flat = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    return flat.mean(0), flat.std(0)


def test_effective_kernel_is_standardised_and_a_regularizer_leaves_it_alone():
    eye = np.eye(12, dtype="float32")  # Dense(eye) returns the effective kernel itself
    seed004 = keras.layers.Dense(5, use_bias=False, kernel_regularizer=lambda k: ws_reg(ops.reshape(k, (2, 2, 3, 5))))
    ours = WeightStandardization(keras.layers.Dense(5, use_bias=False))
    raw_mean, raw_std = _per_filter(to_numpy(seed004(eye)))
    assert np.abs(raw_std - 1).min() > 0.1  # the kernel the regularizer version multiplies with
    np.testing.assert_allclose(to_numpy(seed004(eye)), to_numpy(seed004.kernel))
    mean, std = _per_filter(to_numpy(ours(eye)))
    np.testing.assert_allclose(mean, 0, atol=1e-6)
    np.testing.assert_allclose(std, 1, atol=1e-4)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_wsconv2d_convolves_with_the_standardised_kernel(data_format):
    if data_format == "channels_first" and keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's CPU Conv2D has no NCHW kernel (keras.layers.Conv2D fails the same way)")
    shape = (2, 7, 7, 3) if data_format == "channels_last" else (2, 3, 7, 7)
    x = np.random.RandomState(0).randn(*shape).astype("float32")
    seed004 = keras.layers.Conv2D(4, 3, data_format=data_format, kernel_regularizer=ws_reg)
    layer = WSConv2D(4, 3, data_format=data_format, gain=True)
    out, raw = to_numpy(layer(x)), to_numpy(seed004(x))
    layer.gain.assign(np.array([1.0, 2.0, 0.5, 1.0], "float32"))
    out = to_numpy(layer(x))
    kernel = standardize_kernel(layer.kernel, 1e-6, layer.gain)
    expected = ops.conv(x, kernel, padding="valid", data_format=data_format)
    np.testing.assert_allclose(out, to_numpy(expected), atol=1e-5)
    mean, std = _per_filter(to_numpy(kernel))
    np.testing.assert_allclose(mean, 0, atol=1e-6)
    np.testing.assert_allclose(std, [1.0, 2.0, 0.5, 1.0], rtol=1e-4)
    np.testing.assert_allclose(raw, to_numpy(ops.conv(x, seed004.kernel, data_format=data_format)), atol=1e-5)
    assert np.abs(_per_filter(to_numpy(seed004.kernel))[1] - 1).min() > 0.1


def test_conv1d_causal_and_conv3d():
    x1 = np.random.RandomState(0).randn(2, 9, 3).astype("float32")
    causal = WSConv1D(4, 3, padding="causal", dilation_rate=2)
    out = to_numpy(causal(x1))
    assert out.shape == (2, 9, 4)
    padded = np.pad(x1, ((0, 0), (4, 0), (0, 0)))
    expected = ops.conv(padded, standardize_kernel(causal.kernel), dilation_rate=2) + causal.bias
    np.testing.assert_allclose(out, to_numpy(expected), atol=1e-5)
    x3 = np.random.RandomState(1).randn(1, 4, 4, 4, 2).astype("float32")
    conv3 = WSConv3D(3, 2, use_bias=False)
    np.testing.assert_allclose(to_numpy(conv3(x3)), to_numpy(ops.conv(x3, standardize_kernel(conv3.kernel))), atol=1e-5)


def test_training_and_keras_file_round_trip(tmp_path):
    rng = np.random.RandomState(0)
    x, y = rng.randn(16, 6, 6, 3).astype("float32"), rng.randn(16, 2).astype("float32")
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        WSConv2D(4, 3, gain=True),
        WeightStandardization(keras.layers.Conv2D(4, 3, activation="relu")),
        keras.layers.Flatten(),
        WeightStandardization(keras.layers.Dense(2), gain=True),
    ])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    start = to_numpy(model.layers[0].kernel)
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.abs(to_numpy(model.layers[0].kernel) - start).max() > 0  # gradients reach the stored kernel
    path = os.path.join(tmp_path, "ws.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].get_config()["gain"] is True
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="epsilon must be > 0, got 0"):
        WSConv2D(4, 3, epsilon=0)
    with pytest.raises(ValueError, match="epsilon must be > 0, got -1"):
        WeightStandardization(keras.layers.Dense(2), epsilon=-1)
    with pytest.raises(TypeError, match="wraps a keras.layers.Dense, Conv1D, Conv2D or Conv3D, got Conv2DTranspose"):
        WeightStandardization(keras.layers.Conv2DTranspose(4, 3))
    with pytest.raises(TypeError, match="got LSTM"):
        WeightStandardization(keras.layers.LSTM(4))
