"""Batch average for Keras: exact population statistics of every batch-norm-like layer.

The SN paper (Luo et al., ICLR 2019, Figure 8) recommends it over moving averages: after
training, freeze the network, feed K batches, and set each layer's inference statistics
from them. Keras has no hook for it in the layer, so this is a model tool: each measured
layer's ``call`` is wrapped for the pass, records the moments of its input and normalises
with the batch's own statistics, while the rest of the model runs in inference mode.
"""

from __future__ import annotations

import numpy as np
import keras
from keras import ops

from normkit.keras._switchnorm import SwitchNormalization
from normkit.tools.stats import RecomputeReport

__all__ = ["recompute_stats", "RecomputeStats"]


class _ChannelMoments:
    """Float64 per-channel count, mean and sum of squared deviations, merged exactly (Chan)."""

    def __init__(self):
        self.count = self.mean = self.m2 = None

    def add(self, inputs, mask, axis):
        x = np.moveaxis(np.asarray(ops.convert_to_numpy(inputs), dtype=np.float64), axis, -1)
        x = x.reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[np.asarray(ops.convert_to_numpy(mask), dtype=bool).reshape(-1)]
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        if self.count is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


def _measured_layers(model):
    """``(measured, frozen)``: the layers with moving statistics, trainable or not."""
    measured, frozen = [], []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        is_bn = isinstance(layer, keras.layers.BatchNormalization) and not getattr(layer, "renorm", False)
        is_sn = isinstance(layer, SwitchNormalization) and layer.tracks_moving_stats
        if is_bn or is_sn:
            (measured if layer.trainable else frozen).append(layer)
    return measured, frozen


def _batches(dataset, batch_size):
    """Yield the batches of ``dataset`` (see :func:`recompute_stats` for the accepted kinds)."""
    if isinstance(dataset, keras.utils.PyDataset):
        count = dataset.num_batches
        index = 0
        while count is None or index < count:
            yield dataset[index]
            index += 1
        return
    if hasattr(dataset, "as_numpy_iterator"):  # tf.data.Dataset
        yield from dataset.as_numpy_iterator()
        return
    arrays = keras.tree.flatten(dataset) if isinstance(dataset, (tuple, dict)) else [dataset]
    if arrays and all(hasattr(a, "shape") and hasattr(a, "__getitem__") for a in arrays):
        size = arrays[0].shape[0]
        for start in range(0, size, batch_size):
            yield keras.tree.map_structure(lambda a: a[start : start + batch_size], dataset)
        return
    try:
        iterator = iter(dataset)
    except TypeError:
        raise TypeError(
            "recompute_stats needs arrays, a tuple (x, y), a tf.data.Dataset, a "
            f"keras.utils.PyDataset, a generator or another iterable of batches; got {type(dataset).__name__}"
        ) from None
    yield from iterator


def _batch_size_of(x):
    leaf = keras.tree.flatten(x)[0]
    return int(leaf.shape[0]) if getattr(leaf, "shape", None) else 0


def recompute_stats(model, dataset, steps=None, *, batch_size=32):
    r"""Set the moving statistics of every BatchNormalization and SwitchNormalization layer exactly.

    For each ``keras.layers.BatchNormalization`` and :class:`SwitchNormalization` with a
    ``"bn"`` source, over all valid values ``x`` that reached it from the batches fed:

    .. math:: \text{moving\_mean} = \frac{1}{n}\sum x, \qquad
              \text{moving\_variance} = \frac{1}{n}\sum (x - \text{moving\_mean})^2

    (biased, Keras' convention), by a float64 Chan merge of per-batch moments, so unequal
    batches and masks are weighted by their element counts. Keras masks (``Masking``,
    ``Embedding(mask_zero=True)``, ...) reach the layers as in ``fit``: padded steps count for
    nothing.

    The model runs in inference mode (dropout off), except the measured layers, which
    normalise with each batch's own statistics (the paper's batch average: downstream layers
    see what they saw in training). Layers with ``trainable=False`` are frozen and left
    alone; Batch Renormalization layers too. A layer no batch reached keeps its statistics.

    Args:
        model: a built Keras model (Sequential, functional or subclassed) or a layer.
        dataset: arrays (a numpy array or tensor, a dict of them, or ``(x, y)`` /
            ``(x, y, sample_weight)`` as for ``fit``), split into ``batch_size`` batches; or a
            ``tf.data.Dataset``, a ``keras.utils.PyDataset``, a generator or any iterable
            whose items are ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``.
        steps: feed at most this many batches (a shorter dataset is fine; the report says
            how many were used). Default: None (the whole dataset; required for an endless
            generator).
        batch_size: batch size for array data. Default: 32.

    Returns:
        ``normkit.RecomputeReport`` with the batches and samples fed and the layer names
        updated, never reached, and frozen.

    Raises:
        ValueError: ``steps`` or ``batch_size`` is not a positive int, or the dataset gave no batch.
        TypeError: ``dataset`` is none of the accepted kinds.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int{' or None' if name == 'steps' else ''}, got {value!r}")
    measured, frozen = _measured_layers(model)
    moments = {id(layer): _ChannelMoments() for layer in measured}
    originals = {}

    def recording(layer, original):
        def call(inputs, *args, training=None, mask=None, **kwargs):
            moments[id(layer)].add(inputs, mask, layer.axis % len(inputs.shape))
            return original(inputs, *args, training=True, mask=mask, **kwargs)

        return call

    for layer in measured:
        originals[id(layer)] = layer.call
        object.__setattr__(layer, "call", recording(layer, layer.call))
    batches = samples = 0
    try:
        for data in _batches(dataset, batch_size):
            if steps is not None and batches >= steps:
                break
            x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            model(x, training=False)
            batches += 1
            samples += _batch_size_of(x)
    finally:
        for layer in measured:
            object.__delattr__(layer, "call")
    if batches == 0:
        raise ValueError("recompute_stats needs at least one batch, but the dataset gave none")

    report = RecomputeReport(batches, samples)
    report.frozen.extend(layer.name for layer in frozen)
    for layer in measured:
        stats = moments[id(layer)]
        if stats.count is None:
            report.unreached.append(layer.name)
            continue
        layer.moving_mean.assign(ops.cast(stats.mean, layer.moving_mean.dtype))
        layer.moving_variance.assign(ops.cast(stats.m2 / stats.count, layer.moving_variance.dtype))
        report.updated.append(layer.name)
    return report


class RecomputeStats(keras.callbacks.Callback):
    """Callback: :func:`recompute_stats` at the end of chosen epochs of ``fit``.

    Args:
        dataset, steps, batch_size: as for :func:`recompute_stats`.
        epochs: the (1-based) epochs after which to recompute, e.g. ``[10, 20]``; None: after
            every epoch. Default: None.

    Attributes:
        reports: ``[(epoch, RecomputeReport), ...]`` of the recomputations done.
    """

    def __init__(self, dataset, steps=None, *, epochs=None, batch_size=32):
        super().__init__()
        if epochs is not None:
            epochs = set(epochs)
            if not epochs or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in epochs):
                raise ValueError(f"epochs must be None or 1-based epoch numbers (ints >= 1), got {sorted(epochs, key=str)!r}")
        self.dataset, self.steps, self.batch_size, self.epochs = dataset, steps, batch_size, epochs
        self.reports = []

    def on_epoch_end(self, epoch, logs=None):
        if self.epochs is None or epoch + 1 in self.epochs:
            report = recompute_stats(self.model, self.dataset, self.steps, batch_size=self.batch_size)
            self.reports.append((epoch + 1, report))
