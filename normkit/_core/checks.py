"""Argument checks shared by every op and layer: each error states the invariant, what was
received and how to fix the call."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_eps", "check_float_input", "check_momentum", "check_vector", "check_weights"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be > 0, got {eps!r}")


def check_momentum(momentum: float) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (PyTorch convention: the weight of the new batch), got {momentum!r}"
        )


def check_float_input(x: object, name: str = "input") -> None:
    """Inputs must be real floating-point tensors (int, bool and complex ones are refused)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float16, bfloat16, float32 or float64, got dtype {x.dtype}; convert it with x.float()"
        )
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; use x.to_dense()")


def _check_float_on(t: Tensor, name: str, device: torch.device) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}; move it with .to({str(device)!r})")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_vector(t: Optional[Tensor], name: str, size: int, device: torch.device) -> None:
    """A per-channel tensor (weight, bias, running buffer) must be a float (size,) tensor on
    the input's device; None passes."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.numel() != size or t.dim() != 1:
        raise ValueError(
            f"{name} should contain {size} elements not {t.numel()} (expected shape ({size},), one per channel, "
            f"got shape {tuple(t.shape)})"
        )
    _check_float_on(t, name, device)


def check_weights(t: Optional[Tensor], name: str, sources: tuple[str, ...], device: torch.device) -> None:
    """Importance weights (or logits): one entry per source, required when K > 1."""
    k = len(sources)
    if k == 1 and t is None:
        return
    if t is None:
        raise ValueError(f"{name} must have shape ({k},), one entry per source {sources}, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (k,):
        raise ValueError(f"{name} must have shape ({k},), one entry per source {sources}, got {tuple(t.shape)}")
    _check_float_on(t, name, device)
