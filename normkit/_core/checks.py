"""Argument checks shared by every op and layer: each error states the invariant, what was
received and how to fix the call."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "InputError",
    "UnsupportedDtypeError",
    "check_eps",
    "check_float_input",
    "check_momentum",
    "check_param_dtypes",
    "check_per_channel",
    "check_vector",
    "check_weights",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)


class InputError(ValueError, RuntimeError):
    """A tensor argument that does not fit the call (size, device, dtype mix). A ValueError,
    and a RuntimeError as the same mistake is in ``torch.nn`` (``except RuntimeError`` written
    for torch's layers keeps working)."""


class UnsupportedDtypeError(ValueError, NotImplementedError):
    """A non-floating input (int, bool, complex). A ValueError, and a NotImplementedError as
    torch's ``"batch_norm" not implemented for 'Long'``."""


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be positive (> 0 and finite), got {eps!r}")


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
        raise UnsupportedDtypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got dtype {x.dtype}; convert it with x.float()"
        )
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; use x.to_dense()")


def _check_float_on(t: Tensor, name: str, device: torch.device) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UnsupportedDtypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != device:
        raise InputError(f"{name} is on {t.device} but the input is on {device}; move it with .to({str(device)!r})")
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
        raise InputError(
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
        raise InputError(f"{name} must have shape ({k},), one entry per source {sources}, got {tuple(t.shape)}")
    _check_float_on(t, name, device)


def check_param_dtypes(x: Tensor, **tensors: Optional[Tensor]) -> None:
    """Parameters and statistics have the input's dtype, or float32 for a float16 / bfloat16
    input (torch's rule: a float64 layer on float32 input is refused, not silently rounded)."""
    for name, t in tensors.items():
        if t is None or t.dtype == x.dtype or (t.dtype == torch.float32 and x.dtype in _REDUCED):
            continue
        allowed = f"{x.dtype}" + (" or torch.float32" if x.dtype in _REDUCED else "")
        raise InputError(
            f"mixed dtype: {name} is {t.dtype} but the input is {x.dtype} (expected {allowed}); "
            f"cast the layer (.to({x.dtype})) or the input (x.to({t.dtype}))"
        )


def check_per_channel(x: Tensor, size: int, **tensors: Optional[Tensor]) -> None:
    """:func:`check_vector` for each of ``tensors``, then :func:`check_param_dtypes`, as one
    quick pass (a layer's call runs it on its four per-channel tensors); when anything looks
    off, the full checks run in that order, so the error is the one they give."""
    device, dtype = x.device, x.dtype
    for t in tensors.values():
        if t is not None and (not isinstance(t, Tensor) or t.shape != (size,) or t.device != device
                              or t.layout != torch.strided or t.dtype != dtype):
            break
    else:
        return
    for name, t in tensors.items():
        check_vector(t, name, size, device)
    check_param_dtypes(x, **tensors)
