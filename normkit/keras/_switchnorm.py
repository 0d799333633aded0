"""Switchable Normalization as a Keras 3 layer, a drop-in for ``keras.layers.BatchNormalization``.

Luo, Ren, Peng, Zhang, Li, "Differentiable Learning-to-Normalize via Switchable
Normalization", ICLR 2019 (arXiv:1806.10779). Written with ``keras.ops`` only, so one
implementation runs on the JAX, TensorFlow and PyTorch backends.
"""

from __future__ import annotations

import math

import keras
from keras import constraints, initializers, ops, regularizers

from normkit._core.sources import parse_sources

__all__ = ["SwitchNormalization"]


@keras.saving.register_keras_serializable(package="normkit")
class SwitchNormalization(keras.layers.Layer):
    r"""Switchable Normalization with the arguments and conventions of Keras' BatchNormalization.

    .. math::
        y = \gamma \frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma_k^2 + \epsilon}} + \beta,
        \qquad w = \mathrm{softmax}(\text{mean\_logits}),\quad w' = \mathrm{softmax}(\text{var\_logits})

    ``(mu_k, sigma_k^2)`` are the statistics of source ``k``: ``"in"`` per (sample, channel),
    ``"ln"`` per sample, ``"bn"`` per channel over the batch, ``"gnG"`` per (sample, group of
    C/G channels). All are exact (Chan) merges of two-pass per-(sample, channel) moments
    computed in float32, so there is no ``E[x^2] - E[x]^2`` cancellation and float16 /
    bfloat16 policies keep float32 statistics. Variances are biased, so one-hot weights give
    exactly IN, LN, GN or ``keras.layers.BatchNormalization``.

    Keras conventions (they differ from normkit's torch layers, on purpose, so that replacing
    ``BatchNormalization`` changes nothing else in a Keras model):

    - ``axis=-1``: channels last; ``axis=1`` for channels first. Any rank >= 2.
    - ``momentum`` is the weight of the *old* value:
      ``moving = moving * momentum + batch * (1 - momentum)``, default 0.99 (torch's
      ``momentum=0.1`` is ``0.9`` here).
    - ``moving_variance`` tracks the *biased* batch variance, as Keras does (torch tracks
      the unbiased one: ``torch_running_var = keras_moving_variance * n / (n - 1)`` for a
      batch of ``n`` values per channel).
    - ``epsilon=1e-3`` (torch: 1e-5).
    - ``trainable=False`` puts the layer in inference mode (moving statistics, no update),
      as for Keras' BatchNormalization.
    - ``mask`` (one dim fewer than the input, ``True`` = valid): masked positions touch no
      statistic; their outputs are normalised with the same statistics, as in Keras (the
      mask travels on to later layers). A batch whose channels saw no valid value leaves
      the moving statistics unchanged (Keras' BatchNormalization moves them toward 0).

    Degenerate shapes never give NaN: with one position per channel (e.g. ``(N, C)`` or
    ``(N, 1, 1, C)``) the IN statistics are the value itself with variance 0; with batch 1
    the BN source equals the IN source. IN and LN always come from the sample; only the BN
    source switches to the moving statistics in inference (:func:`normkit.keras.recompute_stats`
    sets them to exact population statistics, the paper's "batch average").

    Args:
        axis: the channel axis. Default: -1.
        momentum: weight of the old value in the moving averages. Default: 0.99.
        epsilon: added to the mixed variance. Default: 1e-3.
        center, scale: learn ``beta`` / ``gamma``. Default: True.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer, beta_constraint,
        gamma_constraint: as in ``keras.layers.BatchNormalization``.
        synchronized: only ``False`` (cross-replica statistics are not implemented).
        sources: the statistics to mix, a non-empty subset of ``"in"``, ``"ln"``, ``"bn"`` and
            ``"gnG"`` (``G`` groups dividing the channels). Default: ``("in", "ln", "bn")``.
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``).

    Weights: ``gamma``, ``beta`` (C,), ``mean_logits``, ``var_logits`` (K,), trainable;
    ``moving_mean``, ``moving_variance`` (C,), non-trainable, only with a ``"bn"`` source.
    ``mean_weights`` / ``var_weights`` are the softmax importance weights.
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        sources=("in", "ln", "bn"),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be one int (the channel axis), got {axis!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(
                f"momentum must be in [0, 1] (Keras convention: the weight of the old value, "
                f"e.g. 0.99), got {momentum}"
            )
        if not float(epsilon) > 0.0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if synchronized:
            raise ValueError(
                "SwitchNormalization does not synchronise statistics across replicas; "
                "got synchronized=True, pass synchronized=False"
            )
        self.axis = axis
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.synchronized = False
        self.sources = parse_sources(sources)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None

    @property
    def tracks_moving_stats(self):
        """True when the layer has a ``"bn"`` source and so ``moving_mean`` / ``moving_variance``."""
        return "bn" in self.sources

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                f"SwitchNormalization needs a batch axis and a channel axis (rank >= 2), "
                f"got input shape {tuple(input_shape)}"
            )
        if not -rank <= self.axis < rank or self.axis % rank == 0:
            raise ValueError(
                f"axis must name the channel axis of a rank-{rank} input, not the batch axis 0: "
                f"expected 1 <= axis < {rank} or -{rank - 1} <= axis <= -1, got axis={self.axis}"
            )
        self._channel_axis = self.axis % rank
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(
                f"the channel axis {self.axis} of input shape {tuple(input_shape)} must have a known size"
            )
        parse_sources(self.sources, channels)  # checks that every gnG's G divides the channels
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                trainable=True, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                trainable=True, autocast=False,
            )
        if self.tracks_moving_stats:
            self.moving_mean = self.add_weight(
                shape=shape, name="moving_mean", initializer=self.moving_mean_initializer,
                trainable=False, autocast=False,
            )
            self.moving_variance = self.add_weight(
                shape=shape, name="moving_variance", initializer=self.moving_variance_initializer,
                trainable=False, autocast=False,
            )
        k = len(self.sources)
        self.mean_logits = self.add_weight(
            shape=(k,), name="mean_logits", initializer="zeros", trainable=True, autocast=False
        )
        self.var_logits = self.add_weight(
            shape=(k,), name="var_logits", initializer="zeros", trainable=True, autocast=False
        )
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={self.axis: channels})

    @property
    def mean_weights(self):
        """Softmax importance weights of the means, one per source in ``sources`` order."""
        return _softmax(self.mean_logits)

    @property
    def var_weights(self):
        """Softmax importance weights of the variances, one per source in ``sources`` order."""
        return _softmax(self.var_logits)

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs, training=None, mask=None):
        rank = len(inputs.shape)
        axis = self._channel_axis
        channels = inputs.shape[axis]
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        positions = [d for d in range(1, rank) if d != axis]
        valid = None
        if mask is not None:
            if len(mask.shape) != rank - 1:
                raise ValueError(
                    f"the mask must have one dim fewer than the inputs (no channel axis), got "
                    f"mask.shape={tuple(mask.shape)} for inputs.shape={tuple(inputs.shape)}"
                )
            valid = ops.cast(ops.expand_dims(ops.cast(mask, "bool"), axis), x.dtype)
        count, mean_in, var_in = _sample_moments(x, positions, valid, channels)
        use_batch = bool(training) and self.trainable
        batch = _merge_over_batch(count, mean_in, var_in) if self.tracks_moving_stats and use_batch else None

        stats = []
        for source in self.sources:
            if source == "in":
                stats.append((mean_in, var_in))
            elif source == "ln":
                stats.append(_merge_over_channels(mean_in, var_in, 1))
            elif source == "bn":
                if batch is not None:
                    stats.append(batch[1:])
                else:
                    moving_mean = ops.reshape(ops.cast(self.moving_mean, x.dtype), (1, channels))
                    moving_var = ops.reshape(ops.cast(self.moving_variance, x.dtype), (1, channels))
                    stats.append((moving_mean, moving_var))
            else:
                stats.append(_merge_over_channels(mean_in, var_in, int(source[2:])))
        mean, var = _mix(stats, self.mean_logits, self.var_logits, x.dtype)

        # y = x * a + b with a = gamma / sqrt(var + eps), b = beta - mean * a: one pass over x.
        a = ops.rsqrt(var + self.epsilon)
        if self.scale:
            a = a * ops.reshape(ops.cast(self.gamma, x.dtype), (1, channels))
        b = -mean * a
        if self.center:
            b = b + ops.reshape(ops.cast(self.beta, x.dtype), (1, channels))
        stat_shape = [-1] + [channels if d == axis else 1 for d in range(1, rank)]
        outputs = x * ops.reshape(a, stat_shape) + ops.reshape(b, stat_shape)

        if batch is not None:
            self._update_moving_stats(*batch)
        return ops.cast(outputs, self.compute_dtype)

    def _update_moving_stats(self, total, batch_mean, batch_var):
        seen = ops.reshape(total > 0, (1,))  # a batch with no valid value keeps the statistics
        for variable, value in ((self.moving_mean, batch_mean), (self.moving_variance, batch_var)):
            old = ops.cast(variable, value.dtype)
            new = old * self.momentum + ops.reshape(value, old.shape) * (1.0 - self.momentum)
            variable.assign(ops.cast(ops.where(seen, new, old), variable.dtype))

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "sources": list(self.sources),
        }
        return {**super().get_config(), **config}


def _sample_moments(x, positions, valid, channels):
    """Per-(sample, channel) ``(count (N, 1), mean (N, C), biased var (N, C))``.

    Unmasked: one pass over ``x`` shifted by its first value per (sample, channel), which lies
    within a few standard deviations of the mean, so ``E[d^2] - E[d]^2`` of the shifted
    ``d`` does not cancel (the shifted-data algorithm) however large the offset of ``x``.
    Masked: two passes, since the first value may be padding.
    """
    if valid is None:
        count = ops.full((1, 1), float(math.prod(x.shape[d] for d in positions)), dtype=x.dtype)
        if not positions:
            return count, x, ops.zeros_like(x)
        first = tuple(slice(0, 1) if d in positions else slice(None) for d in range(len(x.shape)))
        shift = ops.stop_gradient(x[first])  # the moments do not depend on it, so neither do gradients
        shifted = x - shift
        mean_shifted = ops.mean(shifted, axis=positions, keepdims=True)
        var = ops.maximum(ops.mean(ops.square(shifted), axis=positions, keepdims=True) - ops.square(mean_shifted), 0.0)
        mean = shift + mean_shifted
    else:
        count = ops.sum(valid, axis=positions, keepdims=True) if positions else valid
        safe = ops.maximum(count, 1.0)  # a sample with no valid position gets mean 0, var 0
        mean = ops.sum(x * valid, axis=positions, keepdims=True) / safe if positions else x * valid
        centred = (x - mean) * valid
        var = ops.sum(ops.square(centred), axis=positions, keepdims=True) / safe if positions else 0.0 * x
        count = ops.reshape(count, (-1, 1))
    return count, ops.reshape(mean, (-1, channels)), ops.reshape(var, (-1, channels))


def _merge_over_batch(count, mean, var):
    """Chan merge of per-sample moments over the batch: ``(total (1, 1), mean (1, C), var (1, C))``."""
    weights = ops.broadcast_to(count, (ops.shape(mean)[0], 1))
    total = ops.sum(weights, axis=0, keepdims=True)
    share = weights / ops.maximum(total, 1.0)
    merged_mean = ops.sum(share * mean, axis=0, keepdims=True)
    merged_var = ops.sum(share * (var + ops.square(mean - merged_mean)), axis=0, keepdims=True)
    return total, merged_mean, merged_var


def _merge_over_channels(mean, var, groups):
    """Chan merge over the channels of each of ``groups`` groups (equal counts per channel)."""
    channels = mean.shape[1]
    grouped_mean = ops.reshape(mean, (-1, groups, channels // groups))
    grouped_var = ops.reshape(var, (-1, groups, channels // groups))
    merged_mean = ops.mean(grouped_mean, axis=2, keepdims=True)
    merged_var = ops.mean(grouped_var + ops.square(grouped_mean - merged_mean), axis=2, keepdims=True)
    if groups == 1:
        return ops.reshape(merged_mean, (-1, 1)), ops.reshape(merged_var, (-1, 1))
    expand = (ops.shape(grouped_mean)[0], groups, channels // groups)
    return (
        ops.reshape(ops.broadcast_to(merged_mean, expand), (-1, channels)),
        ops.reshape(ops.broadcast_to(merged_var, expand), (-1, channels)),
    )


def _mix(stats, mean_logits, var_logits, dtype):
    """``sum_k softmax(mean_logits)_k mu_k`` and the same for the variances.

    A single source goes through the softmax too (its weight is exactly 1), so the logits
    always have a (zero) gradient, as every trainable weight of a Keras layer should.
    """
    mean_weights = _softmax(ops.cast(mean_logits, dtype))
    var_weights = _softmax(ops.cast(var_logits, dtype))
    mean = sum(mean_weights[k] * mu for k, (mu, _) in enumerate(stats))
    var = sum(var_weights[k] * v for k, (_, v) in enumerate(stats))
    return mean, var


def _softmax(logits):
    # Written out: keras.ops.softmax warns on a size-1 axis, which a single source is.
    e = ops.exp(logits - ops.max(logits))
    return e / ops.sum(e)
