"""Kernel sets, the backend switch, and what serves each device.

Backends: ``'auto'`` (default: the compiled C kernels on CPU, Triton on CUDA, else the
reference path), ``'reference'`` (plain autograd over ATen ops, what the tests compare
against), or one forced set: ``'aten'``, ``'cpu'``, ``'triton'``. ``NORMKIT_BACKEND`` sets
the process default; :func:`use_backend` overrides it for the calling thread only, so
overlapping blocks in two threads never see each other's choice.

No silent fallback: :func:`status` says which kernels serve CPU and CUDA and, when none
does, the exact reason; ``'auto'`` warns once per device type when it falls back.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from normkit.kernels._protocol import KernelSet
from normkit.kernels.aten import ATEN_KERNELS

__all__ = ["BACKENDS", "KernelSet", "get_backend", "select", "set_backend", "status", "use_backend"]

BACKENDS = ("auto", "reference", "aten", "cpu", "triton")
_AUTO = {"cpu": "cpu", "cuda": "triton"}  # device type -> the set 'auto' uses for it


def _validated(name: object, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {', '.join(repr(b) for b in BACKENDS)}, got {name!r}")
    return name  # type: ignore[return-value]


_default = _validated(os.environ.get("NORMKIT_BACKEND", "auto"), "the environment variable NORMKIT_BACKEND")
_local = threading.local()
_lock = threading.Lock()
_loaded: dict[str, Optional[KernelSet]] = {}
_reasons: dict[str, str] = {}
_warned: set[str] = set()


def _import_set(name: str) -> KernelSet:
    if name == "aten":
        return ATEN_KERNELS
    if name == "cpu":
        from normkit.kernels.ops import CPU_KERNELS

        return CPU_KERNELS
    from normkit.kernels.triton import TRITON_KERNELS

    return TRITON_KERNELS


def load(name: str) -> Optional[KernelSet]:
    """The kernel set ``name``, imported once; None (and a recorded reason) when it cannot load."""
    if name not in _loaded:
        with _lock:
            if name not in _loaded:
                try:
                    _loaded[name] = _import_set(name)
                except ImportError as exc:  # the optional toolchain (Triton) is missing
                    _loaded[name], _reasons[name] = None, f"{exc}; install it with pip install normkit[triton]"
                except (OSError, RuntimeError) as exc:  # KernelUnavailable is a RuntimeError
                    _loaded[name], _reasons[name] = None, str(exc)
    return _loaded[name]


def set_backend(name: str) -> None:
    """Set the process-wide default backend (see the module docstring). A forced kernel set
    that cannot load is an error that says why."""
    _validated(name, "backend")
    _require(name)
    global _default
    _default = name


def _require(name: str) -> None:
    if name not in ("auto", "reference") and load(name) is None:
        raise RuntimeError(f"the {name!r} kernels are not available: {_reasons[name]}")


def get_backend() -> str:
    """The backend in effect for the calling thread."""
    return getattr(_local, "backend", None) or _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` in this thread for the duration of the block."""
    _validated(name, "backend")
    _require(name)
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def select(x: Tensor) -> Optional[KernelSet]:
    """The kernel set the current backend picks for ``x``'s device, or None (reference)."""
    backend = get_backend()
    if backend == "reference":
        return None
    if backend != "auto":
        return load(backend)
    device = "cpu" if x.is_cpu else x.device.type  # (device.type formats a string: slow on small inputs)
    name = _AUTO.get(device)
    if name is None:
        return None
    kernels = load(name)
    if kernels is None and device not in _warned:
        _warned.add(device)
        warnings.warn(
            f"normkit: no fused kernels for {device} tensors ({_reasons[name]}); using the reference path. "
            "normkit.kernels.status() says what serves each device.",
            RuntimeWarning,
            stacklevel=4,
        )
    return kernels


def status() -> dict[str, Any]:
    """Which kernels serve each device type under the current backend, and why not when none.

    Returns a dict ``{"backend": ..., "cpu": {"kernels": name or None, "reason": ...,
    "device_present": bool}, "cuda": {...}}``; ``reason`` is None when kernels serve that
    device type (``device_present`` says whether this process has such a device at all).
    """
    backend = get_backend()
    report: dict[str, Any] = {"backend": backend}
    for device, auto_name in _AUTO.items():
        name = auto_name if backend == "auto" else backend
        present = device == "cpu" or torch.cuda.is_available()
        if backend == "reference":
            report[device] = {"kernels": None, "reason": "the 'reference' backend is selected",
                              "device_present": present}
            continue
        kernels = load(name)
        report[device] = {
            "kernels": kernels.name if kernels is not None else None,
            "reason": None if kernels is not None else _reasons.get(name),
            "device_present": present,
        }
    return report


# Register the CPU operators (torch.ops.normkit.*) on import, so that they exist for direct
# calls and for loading exported programs; a library that cannot load is only recorded.
load("cpu")
