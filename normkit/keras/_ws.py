"""Weight Standardization for Keras, applied in the forward pass.

Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", 2019 (arXiv:1903.10520); the optional per-filter gain is the scaled
WS of NF-Nets (Brock et al., ICML 2021). A ``kernel_regularizer`` cannot do this: Keras
adds a regularizer's return value to the loss and convolves with the stored kernel, so a
"WS regularizer" never standardises anything. Here the layer convolves with the
standardised kernel and gradients flow through the standardisation.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["standardize_kernel", "WSConv1D", "WSConv2D", "WSConv3D", "WeightStandardization"]


def standardize_kernel(kernel, epsilon=1e-6, gain=None):
    r"""Standardise each output filter of a Keras kernel over its fan-in.

    Keras kernels keep the output filters on the last axis (``(k..., in/groups, out)`` for
    convolutions, ``(in, out)`` for Dense), whatever the ``data_format``, so filter ``o`` is
    ``kernel[..., o]``: :math:`\hat W_o = g_o (W_o - \mathrm{mean}(W_o)) / \sqrt{\mathrm{Var}(W_o)
    + \epsilon}` with the biased variance, in float32 at least.

    Args:
        kernel: the kernel tensor or variable.
        epsilon: added to the per-filter variance. Default: 1e-6 (as normkit's torch WS).
        gain: optional per-filter gain of shape ``(out,)``.
    """
    dtype = keras.backend.result_type(kernel.dtype, "float32")
    w = ops.cast(kernel, dtype)
    fan_in = list(range(len(w.shape) - 1))
    mean = ops.mean(w, axis=fan_in, keepdims=True)
    var = ops.mean(ops.square(w - mean), axis=fan_in, keepdims=True)
    out = (w - mean) * ops.rsqrt(var + epsilon)
    if gain is not None:
        out = out * ops.cast(gain, dtype)
    return ops.cast(out, kernel.dtype)


def _check_epsilon(epsilon):
    if not float(epsilon) > 0.0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return float(epsilon)


def _forward_with_kernel(layer, inputs, kernel):
    """What ``layer`` (a Dense or a Conv1D/2D/3D) computes, with ``kernel`` in place of its own.

    Written out because Keras has no one hook for it: ``Conv1D.call`` (causal padding)
    convolves ``self.kernel`` directly instead of going through ``convolution_op``.
    """
    if isinstance(layer, keras.layers.Dense):
        outputs = ops.matmul(inputs, kernel)
        channel_axis = -1
    else:
        padding = layer.padding
        if padding == "causal":
            inputs, padding = ops.pad(inputs, layer._compute_causal_padding()), "valid"
        outputs = ops.conv(
            inputs, kernel, strides=list(layer.strides), padding=padding,
            dilation_rate=layer.dilation_rate, data_format=layer.data_format,
        )
        channel_axis = -1 if layer.data_format == "channels_last" else 1
    if layer.use_bias:
        bias_shape = [1] * len(outputs.shape)
        bias_shape[channel_axis] = kernel.shape[-1]
        outputs = outputs + ops.reshape(layer.bias, bias_shape)
    return layer.activation(outputs) if layer.activation is not None else outputs


class _WSConvMixin:
    """Convolves with the standardised kernel instead of ``self.kernel``."""

    def _init_ws(self, epsilon, gain):
        self.epsilon = _check_epsilon(epsilon)
        self.use_gain = bool(gain)
        self.gain = None

    def build(self, input_shape):
        super().build(input_shape)
        if self.use_gain:
            self.gain = self.add_weight(shape=(self.filters,), name="gain", initializer="ones", trainable=True)

    def call(self, inputs):
        return _forward_with_kernel(self, inputs, standardize_kernel(self.kernel, self.epsilon, self.gain))

    # Keras' convolutions save and load exactly their kernel and bias; the gain goes beside them.
    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.gain is not None:
            store["gain"] = self.gain

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.gain is not None:
            self.gain.assign(store["gain"])

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "gain": self.use_gain}


def _ws_conv(base):
    """A Keras Conv class with Weight Standardization (the three differ only in their base)."""

    class WSConv(_WSConvMixin, base):
        __doc__ = f"""``keras.layers.{base.__name__}`` whose kernel is standardised in every forward pass.

        Each output filter of the effective kernel has mean 0 and (biased) std
        ``sqrt(var / (var + epsilon)) ~ 1`` over its fan-in (``kernel_size x in/groups``),
        times a learnable per-filter ``gain`` (init 1) when ``gain=True``; ``layer.kernel``
        stays the trained, unstandardised variable. Channels first and last alike.

        Args:
            *args, **kwargs: as ``keras.layers.{base.__name__}``.
            epsilon: added to the per-filter variance. Default: 1e-6.
            gain: learnable per-filter gain (scaled WS, NF-Net style). Default: False.
        """

        def __init__(self, *args, epsilon=1e-6, gain=False, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_ws(epsilon, gain)

    WSConv.__name__ = WSConv.__qualname__ = f"WS{base.__name__}"
    return keras.saving.register_keras_serializable(package="normkit")(WSConv)


WSConv1D = _ws_conv(keras.layers.Conv1D)
WSConv2D = _ws_conv(keras.layers.Conv2D)
WSConv3D = _ws_conv(keras.layers.Conv3D)


@keras.saving.register_keras_serializable(package="normkit")
class WeightStandardization(keras.layers.Wrapper):
    """Wrap a ``Dense`` or ``Conv1D/2D/3D`` layer so that it computes with its standardised kernel.

    The wrapped layer keeps its own kernel, bias and activation (and so its checkpoint
    names); the wrapper runs the layer's computation with :func:`standardize_kernel`
    applied to the kernel.

    Args:
        layer: a ``keras.layers.Dense``, ``Conv1D``, ``Conv2D`` or ``Conv3D`` (subclasses too).
        epsilon: added to the per-filter variance. Default: 1e-6.
        gain: learnable per-filter gain. Default: False.

    Raises:
        TypeError: another layer type (transposed and depthwise convolutions keep the filters
            on another axis of the kernel).
    """

    def __init__(self, layer, epsilon=1e-6, gain=False, **kwargs):
        supported = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
        transposed = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
        if not isinstance(layer, supported) or isinstance(layer, transposed):
            raise TypeError(
                "WeightStandardization wraps a keras.layers.Dense, Conv1D, Conv2D or Conv3D, "
                f"got {type(layer).__name__}"
            )
        super().__init__(layer, **kwargs)
        self.epsilon = _check_epsilon(epsilon)
        self.use_gain = bool(gain)
        self.gain = None

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self.use_gain:
            units = self.layer.units if isinstance(self.layer, keras.layers.Dense) else self.layer.filters
            self.gain = self.add_weight(shape=(units,), name="gain", initializer="ones", trainable=True)
        self.built = True

    def call(self, inputs):
        kernel = standardize_kernel(self.layer.kernel, self.epsilon, self.gain)
        return _forward_with_kernel(self.layer, inputs, kernel)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "gain": self.use_gain}
