"""Compiled CPU kernels for the fused normalization passes (:mod:`normkit._fused`).

``normkit/csrc/norm_kernels.c`` (plain C + OpenMP, no torch headers) is compiled on first
use with the system C compiler into a cache directory and loaded with :mod:`ctypes`, which
releases the GIL during each call. It provides the four full-size loops of
:class:`normkit._fused.KernelSet` for channels-first ``(N, C, L)`` and channels-last
``(N, L, C)`` memory, float32 / float64 / bfloat16 / float16, and the O(N*C) Switchable
Normalization mixer (Luo et al., ICLR 2019) with its closed-form backward, so that a whole
SN / BN / GN / IN layer costs four passes over memory plus a few microseconds of Python: one
foreign call per direction (``nk_layer_forward``: moments, mixer, apply, running averages;
``nk_layer_backward``: reduce, mixer backward, dx).

Build: any C compiler (``$CC``, else ``cc``/``gcc``/``clang``); ``-O3 -march=native
-fopenmp -fno-math-errno`` (no ``-ffast-math``) (``-march=native`` is dropped when ``NORMKIT_NATIVE=0``; the cache key holds the
CPU's flags). OpenMP code is linked against the ``libgomp`` that the torch wheel bundles, so
torch and these kernels share one thread pool. The library is cached in ``$NORMKIT_CACHE``
(default ``~/.cache/normkit``) under a hash of source, flags and compiler; parallel first
uses are serialised with a file lock and an atomic rename. Any failure raises ImportError,
and :func:`normkit._fused.select_kernels` falls back to the reference path.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from normkit._fused import KernelSet
from normkit.functional import Mixer, Moments, stat_dtype

__all__ = ["CPU_KERNELS", "library_path"]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "norm_kernels.c"


def _cache_dir() -> Path:
    root = os.environ.get("NORMKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "normkit"
    )
    return Path(root)


def _find_compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise ImportError("normkit's CPU kernels need a C compiler (set $CC or install gcc/clang)")


def _torch_libgomp() -> Optional[str]:
    """The OpenMP runtime torch was built with, so that both share one thread pool."""
    libs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    return libs[0] if libs else None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _run(cmd: list[str]) -> Optional[str]:
    """Run a compiler command; the error text on failure, None on success."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr or done.stdout)[-2000:]


def _compile(cc: str, out: Path, native: bool, openmp: bool, gomp: Optional[str]) -> Optional[str]:
    # -fno-math-errno lets sqrt vectorise; no -ffast-math: results keep IEEE semantics
    base = [cc, "-O3", "-std=c11", "-fPIC", "-fno-math-errno"] + (["-march=native"] if native else [])
    obj = out.with_suffix(".o")
    err = _run(base + (["-fopenmp"] if openmp else []) + ["-c", str(_SOURCE), "-o", str(obj)])
    if err is None:
        link = [cc, "-shared", str(obj), "-o", str(out)]
        if openmp:  # torch's own libgomp when it has one, else the compiler's
            link += [gomp, f"-Wl,-rpath,{os.path.dirname(gomp)}"] if gomp else ["-fopenmp"]
        err = _run(link)
    obj.unlink(missing_ok=True)
    return err


def library_path() -> Path:
    """Build (once per source/flags/machine) and return the shared library's path."""
    if not _SOURCE.is_file():
        raise ImportError(f"normkit kernel source not found at {_SOURCE}")
    cc = _find_compiler()
    native = os.environ.get("NORMKIT_NATIVE", "1") != "0"
    gomp = _torch_libgomp()
    stat = os.stat(cc)
    key = hashlib.sha256(
        b"\0".join(
            [_SOURCE.read_bytes(), cc.encode(), f"{stat.st_size}-{stat.st_mtime_ns}".encode(),
             str(native).encode(), str(gomp).encode(), (_cpu_signature() if native else "").encode()]
        )
    ).hexdigest()[:16]
    cache = _cache_dir()
    target = cache / f"norm_kernels-{key}.so"
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImportError(f"cannot create the normkit kernel cache {cache}: {exc}; set $NORMKIT_CACHE") from exc
    with open(cache / f"norm_kernels-{key}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl: the atomic rename below still keeps the cache consistent
            pass
        if target.is_file():  # built by another process while we waited
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        tmp_path = Path(tmp)
        errors = []
        for native_try, openmp_try in ((native, True), (native, False), (False, False)):
            err = _compile(cc, tmp_path, native_try, openmp_try, gomp)
            if err is None:
                os.replace(tmp_path, target)
                return target
            errors.append(err)
        tmp_path.unlink(missing_ok=True)
        raise ImportError(f"building normkit's CPU kernels with {cc} failed:\n{errors[0]}")


# ---- ctypes bindings ---------------------------------------------------------------------

_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double

_lib = ctypes.CDLL(str(library_path()))
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
if _lib.nk_has_half():
    _SUFFIX[torch.float16] = "f16"


def _bind(name: str, restype, argtypes):
    fn = getattr(_lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


class _Fns:
    def __init__(self, sfx: str) -> None:
        self.moments = _bind(f"nk_moments_{sfx}", _INT, [_INT, _P, _I64, _I64, _I64, _P, _P, _INT])
        self.apply = _bind(f"nk_apply_{sfx}", None, [_INT, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT])
        self.reduce = _bind(f"nk_reduce_{sfx}", _INT, [_INT, _P, _P, _I64, _I64, _I64, _P, _P, _P, _INT])
        self.backward_apply = _bind(
            f"nk_backward_apply_{sfx}", None, [_INT, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _INT]
        )


_FNS = {dtype: _Fns(sfx) for dtype, sfx in _SUFFIX.items()}
# the whole layer, one call per direction (see nk_layer_forward / nk_layer_backward)
_LAYER_FWD = {
    dtype: _bind(f"nk_layer_forward_{sfx}", _INT,
                 [_INT, _P, _P, _I64, _I64, _I64, _INT, _P, _P, _INT, _INT] + [_P] * 7 + [_DBL, _INT, _DBL, _P, _P, _INT])
    for dtype, sfx in _SUFFIX.items()
}
_LAYER_BWD = {
    dtype: _bind(f"nk_layer_backward_{sfx}", _INT,
                 [_INT, _P, _P, _P, _I64, _I64, _I64, _INT, _P, _P, _INT] + [_P] * 6 + [_DBL] + [_P] * 4 + [_INT])
    for dtype, sfx in _SUFFIX.items()
}


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(code: int, what: str) -> None:
    if code != 0:
        raise MemoryError(f"normkit CPU kernel {what} failed (code {code}): out of memory for its workspace")


# ---- layouts -----------------------------------------------------------------------------

def _layout(x: Tensor, axis: int) -> Optional[tuple[int, int, int, int]]:
    """``(nlc, N, C, L)`` when x is (N, C, L) or (N, L, C) in memory, else None."""
    ndim = x.dim()
    if ndim < 2 or axis == 0:
        return None
    n, c = x.shape[0], x.shape[axis]
    length = x.numel() // (n * c) if n * c else 0
    if axis == 1 and ndim > 2:  # the common cases first: NCHW, then channels_last
        if x.is_contiguous():
            return 0, n, c, length
        if x.is_contiguous(memory_format=torch.channels_last if ndim == 4 else torch.channels_last_3d) if ndim in (
            4, 5) else False:
            return 1, n, c, length
    if x.movedim(axis, -1).is_contiguous():
        return 1, n, c, length
    if x.movedim(axis, 1).is_contiguous():
        return 0, n, c, length
    return None


def _matching(t: Tensor, like: Tensor, nlc: int, axis: int) -> Tensor:
    """t with like's dtype and (N, C, L) / (N, L, C) memory layout (copied only if needed)."""
    if t.dtype == like.dtype and (
        t.stride() == like.stride() or (t.movedim(axis, -1) if nlc else t.movedim(axis, 1)).is_contiguous()
    ):
        return t
    out = torch.empty_like(like)
    out.copy_(t)
    return out


def _supports(x: Tensor, axis: int) -> bool:
    return x.device.type == "cpu" and x.dtype in _FNS and x.layout == torch.strided and _layout(x, axis) is not None


# ---- the KernelSet -----------------------------------------------------------------------

def _moments(x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    nlc, n, c, length = _layout(x, axis)  # type: ignore[misc]
    stats = torch.empty(2, n, c, dtype=stat_dtype(x.dtype))
    _check(_FNS[x.dtype].moments(nlc, x.data_ptr(), n, c, length, stats[0].data_ptr(), stats[1].data_ptr(),
                                 torch.get_num_threads()), "moments")
    return stats[0], stats[1]


def _apply(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor, axis: int) -> Tensor:
    nlc, n, c, length = _layout(x, axis)  # type: ignore[misc]
    dtype = stat_dtype(x.dtype)
    mu, scale = mu.to(dtype).expand(n, c).contiguous(), scale.to(dtype).expand(n, c).contiguous()
    shift = shift.to(dtype).contiguous()
    y = torch.empty_like(x)
    _FNS[x.dtype].apply(nlc, x.data_ptr(), y.data_ptr(), n, c, length, mu.data_ptr(), scale.data_ptr(),
                        shift.data_ptr(), torch.get_num_threads())
    return y


def _reduce(dy: Tensor, x: Tensor, mean: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    nlc, n, c, length = _layout(x, axis)  # type: ignore[misc]
    dy = _matching(dy, x, nlc, axis)
    mean = mean.contiguous()
    sums = torch.empty(2, n, c, dtype=mean.dtype)
    _check(_FNS[x.dtype].reduce(nlc, dy.data_ptr(), x.data_ptr(), n, c, length, mean.data_ptr(),
                                sums[0].data_ptr(), sums[1].data_ptr(), torch.get_num_threads()), "reduce")
    return sums[0], sums[1]


def _backward_apply(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, p: Tensor, q: Tensor, axis: int) -> Tensor:
    nlc, n, c, length = _layout(x, axis)  # type: ignore[misc]
    dy = _matching(dy, x, nlc, axis)
    mean, scale, p, q = (t.to(mean.dtype).expand(n, c).contiguous() for t in (mean, scale, p, q))
    dx = torch.empty_like(x)
    _FNS[x.dtype].backward_apply(nlc, dy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, length, mean.data_ptr(),
                                 scale.data_ptr(), p.data_ptr(), q.data_ptr(), torch.get_num_threads())
    return dx


# ---- whole-layer fast path: C mixer, closed-form backward ----------------------------------

_KIND = {"in": 0, "ln": 1, "bn": 2}
_plans: dict = {}


def _mixer_plan(mixer: Mixer) -> Optional[tuple]:
    """``(kinds, groups, const_mask)`` ctypes arrays for the C mixer; None if unsupported."""
    key = (mixer.sources, mixer.use_batch_stats, mixer.running_source)
    if key in _plans:
        return _plans[key]
    plan = None
    in_from_running = mixer.running_source == "in" and not mixer.use_batch_stats and "bn" not in mixer.sources
    if mixer.process_group is None and len(mixer.sources) <= 16 and (not in_from_running or mixer.sources == ("in",)):
        kinds = [_KIND.get(s, 3) for s in mixer.sources]
        groups = [int(s[2:]) if s.startswith("gn") else 1 for s in mixer.sources]
        const_mask = 0
        for k, s in enumerate(mixer.sources):
            if (s == "bn" and not mixer.use_batch_stats) or (s == "in" and in_from_running):
                const_mask |= 1 << k
        plan = ((ctypes.c_int * len(kinds))(*kinds), (ctypes.c_int64 * len(groups))(*groups), const_mask)
    _plans[key] = plan
    return plan


def _small(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.detach().to(dtype).contiguous()


class _Spec(NamedTuple):
    """What a layer call needs besides its differentiable inputs."""

    layout: tuple[int, int, int, int]
    axis: int
    mixer: Mixer
    plan: tuple
    running_mean: Optional[Tensor]  # only when the mixer reads them (eval)
    running_var: Optional[Tensor]
    track: int  # 0: no running statistics move; 1: the BN source's; 2: the IN source's
    update: Optional[tuple]  # (momentum, running_mean, running_var) updated in C, else None
    tracked: list  # receives the statistics buffer when the running averages move in Python


class _CpuNorm(torch.autograd.Function):
    """One normalization layer in one C call per direction: moments, C mixer, apply (and
    the running averages); backward: reduce, C mixer backward, dx.

    Statistics live in one buffer ``stats`` of 4 (N, C) rows (mean, var, mu, scale) and 3
    (C,) rows (shift, batch mean, batch var), addressed by offset: a Python view per
    statistic would cost more than the C mixer itself on small inputs."""

    @staticmethod
    def forward(ctx, x, spec, weight, bias, mean_logits, var_logits):  # type: ignore[override]
        nlc, n, c, length = spec.layout
        dtype = stat_dtype(x.dtype)
        kinds, groups, const_mask = spec.plan
        mixer = spec.mixer
        stats = torch.empty(4 * n * c + 3 * c, dtype=dtype)
        keep = [_small(t, dtype) for t in (mean_logits, var_logits, spec.running_mean, spec.running_var, weight,
                                           bias)]  # converted copies must live through the call
        ml, vl, rm, rv, w, b = (None if t is None else t.data_ptr() for t in keep)
        y = torch.empty_like(x)
        momentum, run_mean, run_var = spec.update or (0.0, None, None)
        _check(_LAYER_FWD[x.dtype](
            nlc, x.data_ptr(), y.data_ptr(), n, c, length, len(mixer.sources), kinds, groups, const_mask,
            mixer.needs_input_moments, stats.data_ptr(), ml, vl, rm, rv, w, b, mixer.eps, spec.track, momentum,
            _ptr(run_mean), _ptr(run_var), torch.get_num_threads()), "forward")
        if spec.track and spec.update is None:
            spec.tracked.append(stats)
        ctx.spec = spec
        ctx.save_for_backward(x, stats, weight, bias, mean_logits, var_logits)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, stats, weight, bias, mean_logits, var_logits = ctx.saved_tensors
        spec = ctx.spec
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference graph instead
            return _differentiable_backward(ctx, dy, x, (weight, bias, mean_logits, var_logits))
        nlc, n, c, length = spec.layout
        kinds, groups, const_mask = spec.plan
        k = len(spec.mixer.sources)
        dtype = stats.dtype
        keep = [_small(t, dtype) for t in (mean_logits, var_logits, spec.running_mean, spec.running_var, weight)]
        ml, vl, rm, rv, w = (None if t is None else t.data_ptr() for t in keep)
        dy = _matching(dy, x, nlc, spec.axis)
        need = ctx.needs_input_grad
        sizes = (c, c, k, k)  # weight, bias, mean_logits, var_logits
        work = torch.empty(sum(s for s, want in zip(sizes, need[2:6]) if want) or 1, dtype=dtype)
        wbase, item = work.data_ptr(), work.element_size()
        grads, ptrs, offset = [], [], 0
        for size, want in zip(sizes, need[2:6]):
            grads.append(work[offset: offset + size] if want else None)
            ptrs.append(wbase + offset * item if want else None)
            offset += size if want else 0
        dx = torch.empty_like(x) if need[0] else None
        _check(_LAYER_BWD[x.dtype](
            nlc, dy.data_ptr(), x.data_ptr(), _ptr(dx), n, c, length, k, kinds, groups, const_mask,
            stats.data_ptr(), ml, vl, rm, rv, w, spec.mixer.eps, *ptrs, torch.get_num_threads()), "backward")
        for i, (g, owner) in enumerate(zip(grads, (weight, bias, mean_logits, var_logits))):
            if g is not None and g.dtype != owner.dtype:
                grads[i] = g.to(owner.dtype)
        return (dx, None, *grads)


def _differentiable_backward(ctx, dy: Tensor, x: Tensor, small: tuple) -> tuple:
    """Gradients that autograd can differentiate again (double backward): recompute the
    layer with plain torch ops (:func:`normkit.functional.moments`, the Mixer,
    :func:`normkit.functional.apply_affine`) and let autograd build the graph."""
    from normkit.functional import apply_affine, moments

    spec = ctx.spec
    wants = ctx.needs_input_grad[:1] + ctx.needs_input_grad[2:6]
    inputs = [t for t, want in zip([x, *small], wants) if want]
    mu, scale, shift, _ = spec.mixer(moments(x, spec.axis), *small, spec.running_mean, spec.running_var)
    y = apply_affine(x, mu, scale, shift, spec.axis)
    found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    dx, *grads = [next(found) if want else None for want in wants]
    return (dx, None, *grads)


def _fused(
    x: Tensor, axis: int, mixer: Mixer, small: tuple, momentum: float = 0.1
) -> Optional[tuple[Tensor, Optional[Moments]]]:
    """Run a whole layer through the C mixer (and update its running statistics in place
    when they have the statistics dtype); None when this mixer needs the generic path."""
    plan = _mixer_plan(mixer)
    if plan is None:
        return None
    weight, bias, mean_logits, var_logits, running_mean, running_var = small
    rmean, rvar = running_mean, running_var
    if mixer.use_batch_stats:  # running statistics are not read here, only updated
        rmean = rvar = None
    elif plan[2] and (rmean is None or rvar is None):
        return None
    if len(mixer.sources) == 1:
        mean_logits = var_logits = None
    layout = _layout(x, axis)
    track = 0
    if mixer.use_batch_stats and running_mean is not None and running_var is not None:
        track = 1 if "bn" in mixer.sources else 2 if mixer.running_source == "in" else 0
    update = None
    if track and (running_mean.dtype == running_var.dtype == stat_dtype(x.dtype) and running_mean.is_contiguous()
                  and running_var.is_contiguous()):
        update = (float(momentum), running_mean, running_var)
    spec = _Spec(layout, axis, mixer, plan, rmean, rvar, track, update, [])
    y = _CpuNorm.apply(x, spec, weight, bias, mean_logits, var_logits)
    if not spec.tracked:
        return y, None
    stats = spec.tracked[0]  # running statistics of another dtype: normalize() moves them
    n, c, length = layout[1], layout[2], layout[3]
    rows, offset, count = (1, 4 * n * c + c, n * length) if track == 1 else (n, 0, length)
    mean = stats[offset: offset + rows * c].view(rows, c)
    var = stats[offset + rows * c: offset + 2 * rows * c].view(rows, c)
    return y, Moments(torch.full((rows, 1 if track == 2 else c), float(count), dtype=stats.dtype), mean, var)


CPU_KERNELS = KernelSet("cpu", _supports, _moments, _apply, _reduce, _backward_apply, _fused)
