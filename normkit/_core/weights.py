"""Importance weights from logits: Switchable Normalization's policy (a softmax per set).

Weights are float64 whatever the logits' dtype: the mix's weight gradient sums N*C products
of statistics, which cancel in float32 at large offsets.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["softmax_weights"]


def softmax_weights(mean_logits: Tensor, var_logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(softmax(mean_logits), softmax(var_logits))`` in float64, differentiable.

    Two plain softmaxes: one Python autograd.Function for both measured slower, because the
    node costs more than the ops it saves."""
    return torch.softmax(mean_logits, 0, dtype=torch.float64), torch.softmax(var_logits, 0, dtype=torch.float64)
