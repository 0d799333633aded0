"""Shared by the Keras tests: numpy views of backend tensors and a float64 reference of SN."""

import keras
import numpy as np
from keras import ops


def to_numpy(x):
    if isinstance(x, keras.Variable):  # numpy's array protocol on a JAX variable is deprecated
        x = x.value
    return np.asarray(ops.convert_to_numpy(x))


def moments64(x, axes, mask=None):
    """Mean and biased variance over ``axes`` (keepdims) of the valid values, in float64."""
    x = np.asarray(x, dtype=np.float64)
    valid = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    count = np.maximum(valid.sum(axis=axes, keepdims=True), 1.0)
    mean = (x * valid).sum(axis=axes, keepdims=True) / count
    var = (((x - mean) * valid) ** 2).sum(axis=axes, keepdims=True) / count
    return mean, var


def switchnorm64(x, source_stats, mean_weights, var_weights, gamma, beta, eps, axis=-1):
    """The SN formula on given per-source ``(mean, var)`` arrays that broadcast against ``x``."""
    x = np.asarray(x, dtype=np.float64)
    mean = sum(w * m for w, (m, _) in zip(mean_weights, source_stats))
    var = sum(w * v for w, (_, v) in zip(var_weights, source_stats))
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - mean) / np.sqrt(var + eps) * np.reshape(gamma, shape) + np.reshape(beta, shape)


def group_moments64(x, axis, groups):
    """Per-(sample, group of channels) mean and biased variance, shaped to broadcast against ``x``."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    c = moved.shape[-1]
    grouped = moved.reshape(moved.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    stats = moments64(grouped, axes)
    return tuple(np.moveaxis(np.repeat(s, c // groups, axis=-1).reshape(s.shape[:-2] + (c,)), -1, axis) for s in stats)
