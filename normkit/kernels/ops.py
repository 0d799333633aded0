"""normkit's fused layer as torch operators (namespace ``normkit``).

Importance weights and their gradients are float64 whatever the input dtype: there are K of
them, and the weight gradient sums N*C products of statistics that float32 would cancel.

* ``normkit::layer_forward``: moments, mix and apply of one normalization in one kernel
  call; returns ``(y, stats)``. Pure, so eval and export graphs carry no mutation. With
  ``softmax=True`` the weights arguments are logits of the statistics dtype, mixed with their
  softmax (Switchable Normalization), and ``layer_backward`` returns the logits' gradients.
* ``normkit::update_running_``: moves the running averages in place from ``stats``.
* ``normkit::layer_backward``: the two backward sums, the closed-form mix backward and
  ``dx``; returns ``(dx, dweight, dbias, dmean_weights, dvar_weights)`` (empty when not asked).

Registered with ``torch.library`` (schema, CPU kernel, fake kernel, autograd), so
FakeTensor, the meta device, ``torch.compile`` (the op is one node of the graph),
``torch.export`` and ``opcheck`` see a real operator. Every tensor argument is validated
(shape, dtype, device, layout, contiguity) before a pointer reaches C. The autograd kernel
runs ``layer_backward``; when a graph of the gradient is wanted (double backward) or a
``torch.func`` transform is active it recomputes the layer with the reference maths
(:mod:`normkit._core`) and lets autograd differentiate that instead.

Why ``torch.library.Library`` with a Python autograd kernel and not ``custom_op``: its
per-call overhead is about half of custom_op's (``docs/ARCHITECTURE.md`` has the figures).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _len_torch_dispatch_stack

from normkit._core import (
    MixSpec,
    Moments,
    RenormSpec,
    SoftmaxMixSpec,
    apply_affine,
    check_momentum,
    moments,
    spec_from_codes,
    stat_dtype,
)
from normkit.kernels import cpu
from normkit.kernels._generic import kernel_mask
from normkit.kernels._protocol import KernelSet

__all__ = ["CPU_KERNELS", "layer_norm_op"]

_lib = torch.library.Library("normkit", "DEF")
_lib.define(
    "layer_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean_weights, Tensor? var_weights, "
    "Tensor? running_mean, Tensor? running_var, int[] kinds, int[] groups, int constant_mask, float eps, "
    "int axis, float[]? renorm=None, bool softmax=False) -> (Tensor, Tensor)"
)
_lib.define(
    "update_running_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor stats, int n, int c, int length, "
    "int track, float momentum, float eps=0.0) -> ()"
)
_lib.define(
    "layer_backward(Tensor dy, Tensor x, Tensor stats, Tensor? weight, Tensor? mean_weights, "
    "Tensor? var_weights, Tensor? running_mean, Tensor? running_var, int[] kinds, int[] groups, "
    "int constant_mask, float eps, int axis, bool[] output_mask, float[]? renorm=None, bool softmax=False) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_TRACK = {None: 0, "bn": 1, "in": 2}
_RENORM_TRACK = 3


# ---- validation ----------------------------------------------------------------------------

_VALID_SPECS: set = set()


def _validate_spec(c: int, kinds, groups, constant_mask: int, eps: float, renorm=None, softmax=False) -> None:
    # A pure function of these values, so checked once per spec and channel count (symbolic
    # sizes under tracing are not hashable: checked every time).
    key = (c, tuple(kinds), tuple(groups), constant_mask, eps, tuple(renorm) if renorm else None, softmax) \
        if type(c) is int else None
    if key in _VALID_SPECS:
        return
    k = len(kinds)
    if not 1 <= k <= cpu.MAX_SOURCES or len(groups) != k:
        raise ValueError(f"kinds and groups must have the same length in [1, {cpu.MAX_SOURCES}], got {k} and {len(groups)}")
    for kind, g in zip(kinds, groups):
        if kind not in (0, 1, 2, 3):
            raise ValueError(f"source kinds must be 0 (in), 1 (ln), 2 (bn) or 3 (gn), got {kind}")
        if (kind == 3 and (g < 1 or c % g)) or (kind != 3 and g != 1):
            raise ValueError(f"group count {g} of a kind-{kind} source is invalid for {c} channels")
    if not 0 <= constant_mask < (1 << k) or any((constant_mask >> i) & 1 and kinds[i] not in (0, 2) for i in range(k)):
        raise ValueError(f"constant_mask {constant_mask} must mark only in/bn sources among {k}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if renorm:
        if len(renorm) != 2 or not (1.0 <= renorm[0] < math.inf and 0.0 <= renorm[1] < math.inf):
            raise ValueError(f"renorm must be [r_max >= 1, d_max >= 0], both finite, got {list(renorm)}")
        if tuple(kinds) != (2,) or constant_mask:
            raise ValueError(f"renorm needs the one batch-statistics source kind 2 (bn), got kinds {list(kinds)} "
                             f"and constant_mask {constant_mask}")
    if softmax and k < 2:
        raise ValueError(f"softmax mixes two or more sources' logits, got {k} source kind(s) {list(kinds)}")
    if key is not None and len(_VALID_SPECS) < 4096:
        _VALID_SPECS.add(key)


def _validate_small(x: Tensor, c: int, k: int, weight, bias, mean_weights, var_weights, running_mean,
                    running_var, constant_mask: int, renorm=None, softmax=False) -> None:
    dtype = stat_dtype(x.dtype)
    weights_dtype = cpu.weight_grad_dtype(dtype, softmax)  # float64 weights, or logits
    for t, name, size, kind in ((weight, "weight", c, dtype), (bias, "bias", c, dtype),
                                (mean_weights, "mean_weights", k, weights_dtype),
                                (var_weights, "var_weights", k, weights_dtype),
                                (running_mean, "running_mean", c, dtype), (running_var, "running_var", c, dtype)):
        if t is not None:
            cpu._stat(t, name, (size,), kind)
    if k > 1 and (mean_weights is None or var_weights is None):
        raise ValueError(f"mean_weights and var_weights of shape ({k},) are required with {k} sources")
    if (constant_mask or renorm) and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when a source reads running averages "
                         "or with renorm")


def _validate_forward(x, weight, bias, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                      constant_mask, eps, axis, renorm=None, softmax=False) -> tuple[int, int, int, int]:
    layout = cpu.check_pass_input(x, axis)
    c = layout[2]
    _validate_spec(c, kinds, groups, constant_mask, eps, renorm, softmax)
    _validate_small(x, c, len(kinds), weight, bias, mean_weights, var_weights, running_mean, running_var,
                    constant_mask, renorm, softmax)
    return layout


def _validate_update(running_mean, running_var, stats, n, c, length, track, momentum, eps) -> None:
    if track not in (1, 2, _RENORM_TRACK) or min(n, c, length) < 1:
        raise ValueError(f"track must be 1 (bn), 2 (in) or 3 (renorm) and n, c, length >= 1, got {track}, {n}, {c}, "
                         f"{length}")
    if track == _RENORM_TRACK and not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0 for the renorm update, got {eps}")
    dtype = stats.dtype if isinstance(stats, Tensor) else None
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"stats must be a float32 or float64 tensor, got {dtype}")
    cpu._stat(stats, "stats", (cpu.stats_size(n, c, track == _RENORM_TRACK),), dtype)
    cpu._stat(running_mean, "running_mean", (c,), dtype)
    cpu._stat(running_var, "running_var", (c,), dtype)
    if not (isinstance(momentum, float) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if n * length >= 2**62:
        raise ValueError(f"n * length = {n * length} values is out of range for the running update")
    if running_mean.requires_grad or running_var.requires_grad:
        raise RuntimeError("running_mean and running_var must not require grad: they are updated in place")


def _validate_dy(dy, x) -> None:
    cpu._like_x(dy, x, "dy")
    if dy.dtype not in cpu.DTYPES:
        raise ValueError(f"dy must have a floating dtype in {cpu.DTYPES}, got {dy.dtype}")


def _validate_backward(dy, x, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                       constant_mask, eps, axis, output_mask, renorm=None, softmax=False) -> None:
    _, n, c, _ = cpu.check_pass_input(x, axis)
    _validate_dy(dy, x)
    _validate_spec(c, kinds, groups, constant_mask, eps, renorm, softmax)
    # renorm's backward reads r and d from stats, not the running statistics
    _validate_small(x, c, len(kinds), weight, None, mean_weights, var_weights, running_mean, running_var,
                    constant_mask, softmax=softmax)
    cpu._stat(stats, "stats", (cpu.stats_size(n, c, bool(renorm)),), stat_dtype(x.dtype))
    if len(output_mask) != 5:
        raise ValueError(f"output_mask must have 5 entries (dx, dweight, dbias, dmean_weights, dvar_weights), "
                         f"got {len(output_mask)}")


# ---- kernels -------------------------------------------------------------------------------

def _layer_forward_cpu(x, weight, bias, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                       constant_mask, eps, axis, renorm=None, softmax=False):
    args = (x, weight, bias, mean_weights, var_weights, running_mean, running_var, kinds, groups, constant_mask,
            eps, axis, renorm, softmax)
    layout = _validate_forward(*args)
    return cpu.layer_forward(*args, layout=layout)


def _update_running_cpu(running_mean, running_var, stats, n, c, length, track, momentum, eps=0.0):
    _validate_update(running_mean, running_var, stats, n, c, length, track, momentum, eps)
    cpu.update_running(running_mean, running_var, stats, n, c, length, track, momentum, eps)
    torch.autograd.graph.increment_version(running_mean)
    torch.autograd.graph.increment_version(running_var)


def _update_running_eager(running_mean, running_var, stats, n, c, length, track, momentum, eps):
    """The operator's update in eager mode, with ``stats`` fresh from the forward and the
    running tensors of its dtype and contiguous: what the kernel's validation would still
    find wrong is checked here, and a call that fails it raises that validation's error."""
    if running_mean.shape == (c,) and running_var.shape == (c,) and running_mean.is_cpu and running_var.is_cpu \
            and not (running_mean.requires_grad or running_var.requires_grad) and 0.0 <= momentum <= 1.0 \
            and running_mean.layout == torch.strided and running_var.layout == torch.strided \
            and cpu.storage_covers(running_mean, c) and cpu.storage_covers(running_var, c):
        cpu.update_running(running_mean, running_var, stats, n, c, length, track, momentum, eps)
        torch.autograd.graph.increment_version(running_mean)
        torch.autograd.graph.increment_version(running_var)
    else:
        _update_running_cpu(running_mean, running_var, stats, n, c, length, track, momentum, eps)


@torch.library.register_fake("normkit::update_running_", lib=_lib)
def _update_running_fake(running_mean, running_var, stats, n, c, length, track, momentum, eps=0.0):
    _same_device(stats, running_mean=running_mean, running_var=running_var)
    size = cpu.stats_size(n, c, track == _RENORM_TRACK)
    if tuple(running_mean.shape) != (c,) or tuple(running_var.shape) != (c,) or tuple(stats.shape) != (size,):
        raise ValueError(f"running_mean and running_var must have shape ({c},) and stats ({size},)")


def _layer_backward_cpu(dy, x, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                        constant_mask, eps, axis, output_mask, renorm=None, softmax=False):
    args = (dy, x, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds, groups,
            constant_mask, eps, axis, output_mask, renorm, softmax)
    _validate_backward(*args)
    return cpu.layer_backward(*args)


def _same_device(x: Tensor, **tensors) -> None:
    """Fake and meta calls run no kernel, but a mixed-device call must fail there too."""
    for name, t in tensors.items():
        if t is not None and (not isinstance(t, Tensor) or t.device != x.device):
            got = t.device if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be on the input's device {x.device}, got {got}")


def _fake_shapes(x: Tensor, axis: int, kinds, groups, constant_mask: int, eps: float, renorm=None, softmax=False,
                 **tensors) -> tuple[int, int]:
    if not 0 < axis < x.dim():
        raise ValueError(f"axis must be a channel axis in [1, {x.dim() - 1}], got {axis}")
    n, c = x.shape[0], x.shape[axis]
    _validate_spec(c, kinds, groups, constant_mask, eps, renorm, softmax)
    for name, t in tensors.items():
        size = len(kinds) if name.endswith("weights") else c
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    return n, c


@torch.library.register_fake("normkit::layer_forward", lib=_lib)
def _layer_forward_fake(x, weight, bias, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                        constant_mask, eps, axis, renorm=None, softmax=False):
    small = dict(weight=weight, bias=bias, mean_weights=mean_weights, var_weights=var_weights,
                 running_mean=running_mean, running_var=running_var)
    _same_device(x, **small)
    if renorm and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required with renorm")
    n, c = _fake_shapes(x, axis, kinds, groups, constant_mask, eps, renorm, softmax, **small)
    return torch.empty_like(x), x.new_empty(cpu.stats_size(n, c, bool(renorm)), dtype=stat_dtype(x.dtype))


@torch.library.register_fake("normkit::layer_backward", lib=_lib)
def _layer_backward_fake(dy, x, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                         constant_mask, eps, axis, output_mask, renorm=None, softmax=False):
    small = dict(weight=weight, mean_weights=mean_weights, var_weights=var_weights, running_mean=running_mean,
                 running_var=running_var)
    _same_device(x, dy=dy, stats=stats, **small)
    n, c = _fake_shapes(x, axis, kinds, groups, constant_mask, eps, renorm, softmax, **small)
    size = cpu.stats_size(n, c, bool(renorm))
    if dy.shape != x.shape or tuple(stats.shape) != (size,) or len(output_mask) != 5:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, stats ({size},) entries and "
                         f"output_mask 5, got {tuple(dy.shape)}, {tuple(stats.shape)}, {len(output_mask)}")
    k, dtype = len(kinds), stats.dtype
    sizes = (c, c, k if k > 1 else 0, k if k > 1 else 0)
    weights_dtype = cpu.weight_grad_dtype(dtype, softmax)
    dtypes = (dtype, dtype, weights_dtype, weights_dtype)
    dx = torch.empty_like(x) if output_mask[0] else x.new_empty(0)
    return (dx, *[stats.new_empty(size if want else 0, dtype=kind)
                  for size, want, kind in zip(sizes, output_mask[1:], dtypes)])


# ---- autograd ------------------------------------------------------------------------------

class _LayerFunction(torch.autograd.Function):
    """The autograd node of ``normkit::layer_forward``. The operator's non-tensor arguments
    travel as one tuple ``codes = (kinds, groups, constant_mask, eps, axis, renorm, softmax)``: each
    argument of ``apply`` costs autograd a check, and on small inputs that overhead is the bulk
    of a call."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weights, var_weights, running_mean, running_var, codes,
                direct=False):  # type: ignore[override]
        codes = _full_codes(codes)
        kinds, groups, constant_mask, eps, axis, renorm, softmax = codes
        args = (x, weight, bias, mean_weights, var_weights, running_mean, running_var, kinds, groups, constant_mask,
                eps, axis, renorm, softmax)
        if direct:
            y, stats = _layer_forward_cpu(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                y, stats = torch.ops.normkit.layer_forward(*args)
        ctx.codes = codes
        ctx.direct = direct
        if not constant_mask:  # renorm reads running statistics that move right after; its r, d are in stats
            running_mean = running_var = None
        ctx.save_for_backward(x, stats, weight, bias, mean_weights, var_weights, running_mean, running_var)
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, dy, _dstats):  # type: ignore[override]
        x, stats, weight, bias, mean_weights, var_weights, running_mean, running_var = ctx.saved_tensors
        kinds, groups, constant_mask, eps, axis, renorm, softmax = ctx.codes
        need = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
            spec = spec_from_codes(tuple(kinds), tuple(groups), constant_mask, eps, renorm, softmax)
            grads = differentiable_backward(spec, axis, dy, x, weight, bias, mean_weights, var_weights,
                                            running_mean, running_var, need,
                                            stats[4 * x.shape[0] * x.shape[axis] + 3 * x.shape[axis]:] if renorm else None)
        else:
            args = (dy, x, stats, weight, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                    constant_mask, eps, axis, need, renorm, softmax)
            # A batched dy (torch's batched-gradient checks) needs the dispatcher's vmap fallback.
            if ctx.direct and _is_dense_cpu(dy):
                # Everything but dy was validated by the forward and saved (autograd's version
                # counters refuse saved tensors changed in place since).
                _validate_dy(dy, x)
                out = cpu.layer_backward_wanted(*args)
            else:
                out = torch.ops.normkit.layer_backward(*args)
            grads = [g if want else None for g, want in zip(out, need)]
        return (*grads, None, None, None, None)


_CODE_DEFAULTS = (None, False)  # renorm, softmax: the schema's defaults


def _full_codes(codes: tuple) -> tuple:
    """``codes`` with ``renorm`` and ``softmax`` (the schema's defaults where the caller left
    them out)."""
    return codes if len(codes) == 7 else (*codes, *_CODE_DEFAULTS[len(codes) - 5:])


def differentiable_backward(spec: MixSpec, axis: int, dy: Tensor, x: Tensor, weight, bias, mean_weights,
                            var_weights, running_mean, running_var, need, rd: Optional[Tensor],
                            valid: Optional[Tensor] = None) -> list:
    """Gradients by autograd through the reference maths (a graph when grad mode is on):
    double backward, and batched gradients under ``torch.func`` transforms. ``rd``: Batch
    Renorm's ``r`` and ``d`` of the forward (``(2C,)``); ``valid``: the bool mask of a masked
    layer, x's shape without its channel axis."""
    inputs = (x, weight, bias, mean_weights, var_weights)
    wanted = [t for t, want in zip(inputs, need) if want and t is not None]
    keep = None if valid is None else valid.unsqueeze(axis).expand(x.shape)
    with torch.enable_grad():
        m_in = moments(x, axis, valid)
        if isinstance(spec, RenormSpec):
            mu, scale, shift, _ = spec.mix(m_in, None, None, weight, bias, correction=tuple(rd.detach().view(2, -1)))
        else:
            mu, scale, shift, _ = spec.mix(m_in, mean_weights, var_weights, weight, bias, running_mean, running_var)
        if keep is None:
            y = apply_affine(x, mu, scale, shift, axis)
        else:  # zeros in padded positions before and after, as the reference path
            y = torch.where(keep, apply_affine(torch.where(keep, x, 0.0), mu, scale, shift, axis), 0.0)
    found = iter(torch.autograd.grad(y, wanted, dy, create_graph=torch.is_grad_enabled(), allow_unused=True))
    return [next(found) if want and t is not None else None for t, want in zip(inputs, need)]


def _layer_forward_autograd(*args):
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args[:5]):
        return _LayerFunction.apply(*args[:7], args[7:])
    with torch._C._AutoDispatchBelowAutograd():  # nothing to differentiate: skip the autograd node
        return torch.ops.normkit.layer_forward(*args)


_lib.impl("layer_forward", _layer_forward_cpu, "CPU")
_lib.impl("layer_backward", _layer_backward_cpu, "CPU")
_lib.impl("update_running_", _update_running_cpu, "CPU")
_lib.impl("layer_forward", _layer_forward_autograd, "Autograd")


# ---- the call a kernel set exposes -----------------------------------------------------------

def _as_stat(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A small tensor in the statistics dtype, contiguous (differentiable conversion)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def _is_dense_cpu(t: Tensor) -> bool:
    """A plain CPU tensor: not a wrapper (batched, functional, fake) of one."""
    return torch._C._dispatch_keys(t).has(torch._C.DispatchKey.CPU)


def _plain_eager(x: Tensor) -> bool:
    """Eager mode on a plain tensor, with no dispatch mode watching: then the layer calls the
    operators' registered (validating) kernels directly, saving the dispatcher's round trips
    into Python. Under compile, export, FakeTensor, functionalization or
    any TorchDispatchMode the calls go through the dispatcher."""
    return (type(x) is Tensor or type(x) is torch.nn.Parameter) and _is_dense_cpu(x) \
        and not torch.compiler.is_compiling() and _len_torch_dispatch_stack() == 0


class _MaskedLayerFunction(torch.autograd.Function):
    """A masked layer in eager mode on CPU: one C call per direction, the masked passes around
    the C mixer, which weights the batch merge by each sample's valid count (no Python mix).
    ``codes`` as for :class:`_LayerFunction`; ``masks = (valid, mask8)`` from
    :func:`kernel_mask`; ``total_out``: a one-item list that receives the batch's valid count
    (for the running update). Returns ``(y, stats)`` (see :func:`cpu.masked_stats_size`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_weights, var_weights, running_mean, running_var, codes,
                masks, total_out):  # type: ignore[override]
        kinds, groups, constant_mask, eps, axis, renorm, softmax = codes
        valid, mask8 = masks
        _validate_forward(x, weight, bias, mean_weights, var_weights, running_mean, running_var, kinds, groups,
                          constant_mask, eps, axis, renorm, softmax)
        y, stats, total_out[0] = cpu.layer_forward_masked(x, mask8, weight, bias, mean_weights, var_weights,
                                                          running_mean, running_var, kinds, groups, constant_mask,
                                                          eps, axis, renorm, softmax)
        ctx.codes, ctx.valid = codes, valid
        if not constant_mask:  # renorm's running statistics move right after; its r, d are in stats
            running_mean = running_var = None
        ctx.save_for_backward(x, stats, mask8, weight, bias, mean_weights, var_weights, running_mean, running_var)
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, dy, _dstats):  # type: ignore[override]
        x, stats, mask8, weight, bias, mean_weights, var_weights, running_mean, running_var = ctx.saved_tensors
        kinds, groups, constant_mask, eps, axis, renorm, softmax = ctx.codes
        need = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() or not _is_dense_cpu(dy):
            spec = spec_from_codes(tuple(kinds), tuple(groups), constant_mask, eps, renorm, softmax)
            n, c = x.shape[0], x.shape[axis]
            rd = stats[4 * n * c + 3 * c:4 * n * c + 5 * c] if renorm else None
            grads = differentiable_backward(spec, axis, dy, x, weight, bias, mean_weights, var_weights, running_mean,
                                            running_var, need, rd, ctx.valid)
            return (*grads, None, None, None, None, None)
        _validate_dy(dy, x)
        grads = cpu.layer_backward_masked(dy, x, mask8, stats, weight, mean_weights, var_weights, running_mean,
                                          running_var, kinds, groups, constant_mask, eps, axis, need, renorm, softmax)
        return (*grads, None, None, None, None, None)


def _operator_args(x: Tensor, spec: MixSpec, weight, bias, mean_weights, var_weights, running_mean, running_var,
                   axis: int):
    """A spec and its small tensors as the C layer reads them: ``(codes, statistics dtype,
    weight, bias, mean_weights, var_weights, read_mean, read_var)`` with ``codes = (kinds,
    groups, constant_mask, eps, axis, renorm, softmax)``, the tensors in the dtypes and layout
    the operators check (a :class:`SoftmaxMixSpec`'s weights are logits of the statistics
    dtype, the others' float64 weights)."""
    kinds, groups, constant_mask = spec.codes
    renorm = [spec.r_max, spec.d_max] if type(spec) is RenormSpec else None
    softmax = type(spec) is SoftmaxMixSpec
    dtype = stat_dtype(x.dtype)
    weight, bias = _as_stat(weight, dtype), _as_stat(bias, dtype)
    if len(kinds) == 1:
        mean_weights = var_weights = None
    else:
        weights_dtype = cpu.weight_grad_dtype(dtype, softmax)
        mean_weights, var_weights = _as_stat(mean_weights, weights_dtype), _as_stat(var_weights, weights_dtype)
    read_mean = read_var = None
    if constant_mask or renorm:
        read_mean, read_var = _as_stat(_detached(running_mean), dtype), _as_stat(_detached(running_var), dtype)
    codes = (kinds, groups, constant_mask, float(spec.eps), axis, renorm, softmax)
    return codes, dtype, weight, bias, mean_weights, var_weights, read_mean, read_var


def masked_layer_op(x: Tensor, spec: MixSpec, weight, bias, mean_weights, var_weights, running_mean, running_var,
                    momentum: float, axis: int, mask: Tensor) -> tuple[Tensor, Optional[Moments]]:
    """A masked layer in eager mode on plain CPU tensors: ``(y, tracked)``. Batch running
    statistics of the statistics dtype are moved here, in C, over the batch's valid values
    (``tracked`` None); otherwise ``tracked`` holds the statistics the caller moves them
    with (per-sample ones for an IN running average, the batch's otherwise)."""
    codes, dtype, weight, bias, mean_weights, var_weights, read_mean, read_var = \
        _operator_args(x, spec, weight, bias, mean_weights, var_weights, running_mean, running_var, axis)
    eps, renorm = codes[3], codes[5]
    masks = kernel_mask(x, axis, mask)
    total = [0]  # the valid values of the batch, counted by the C forward
    y, stats = _MaskedLayerFunction.apply(x, weight, bias, mean_weights, var_weights, read_mean, read_var, codes,
                                          masks, total)
    if spec.tracked is None or running_mean is None or running_var is None:
        return y, None
    n, c = x.shape[0], x.shape[axis]
    stats = stats.detach()
    count_at = cpu.stats_size(n, c, bool(renorm))
    if spec.tracked == "in":
        return y, Moments(stats[count_at:].view(n, 1), stats[:n * c].view(n, c), stats[n * c:2 * n * c].view(n, c))
    if running_mean.dtype == dtype and running_var.dtype == dtype and running_mean.is_contiguous() \
            and running_var.is_contiguous() and not (running_mean.requires_grad or running_var.requires_grad):
        check_momentum(momentum)
        cpu.update_masked_running(running_mean, running_var, stats, n, c, total[0], float(momentum), eps,
                                  bool(renorm))
        torch.autograd.graph.increment_version(running_mean)
        torch.autograd.graph.increment_version(running_var)
        return y, None
    offset = 4 * n * c + c
    return y, Moments(stats.new_full((1, 1), float(total[0])), stats[offset:offset + c].view(1, c),
                      stats[offset + c:offset + 2 * c].view(1, c))


def layer_norm_op(x: Tensor, spec: MixSpec, weight, bias, mean_weights, var_weights, running_mean, running_var,
                  momentum: float, axis: int) -> tuple[Tensor, Optional[Moments]]:
    """Run one layer through ``normkit::layer_forward``: ``(y, tracked)`` where ``tracked``
    holds the batch statistics when the caller still has to move the running averages (they
    are of another dtype than the statistics; otherwise ``normkit::update_running_`` moved
    them), else None."""
    codes, dtype, weight, bias, mean_weights, var_weights, read_mean, read_var = \
        _operator_args(x, spec, weight, bias, mean_weights, var_weights, running_mean, running_var, axis)
    eps, renorm = codes[3], codes[5]
    eager = _plain_eager(x)
    if not eager:
        y, stats = torch.ops.normkit.layer_forward(x, weight, bias, mean_weights, var_weights, read_mean, read_var,
                                                   *codes)
    elif torch.is_grad_enabled() and (x.requires_grad or _any_requires_grad(weight, bias, mean_weights, var_weights)):
        y, stats = _LayerFunction.apply(x, weight, bias, mean_weights, var_weights, read_mean, read_var, codes, True)
    else:
        y, stats = _layer_forward_cpu(x, weight, bias, mean_weights, var_weights, read_mean, read_var, *codes)
    track = _RENORM_TRACK if renorm else _TRACK[spec.tracked]
    if not track or running_mean is None or running_var is None:
        return y, None
    n, c = x.shape[0], x.shape[axis]
    length = x.numel() // (n * c)
    if running_mean.dtype == dtype and running_var.dtype == dtype and running_mean.is_contiguous() \
            and running_var.is_contiguous():
        if eager:
            _update_running_eager(running_mean, running_var, stats, n, c, length, track, float(momentum), eps)
        else:
            torch.ops.normkit.update_running_(running_mean, running_var, stats.detach(), n, c, length, track,
                                              float(momentum), eps)
        return y, None
    stats = stats.detach()
    if track != 2:  # running statistics of another dtype: the caller moves them
        offset = 4 * n * c + c
        mean, var = stats[offset:offset + c].view(1, c), stats[offset + c:offset + 2 * c].view(1, c)
        return y, Moments(stats.new_full((1, c), float(n * length)), mean, var)
    mean, var = stats[: n * c].view(n, c), stats[n * c: 2 * n * c].view(n, c)
    return y, Moments(stats.new_full((n, 1), float(length)), mean, var)


def _detached(t: Tensor) -> Tensor:
    return t.detach() if t.requires_grad else t


def _any_requires_grad(*tensors: Optional[Tensor]) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


CPU_KERNELS: KernelSet = cpu.CPU_KERNELS._replace(layer_specs=(MixSpec, RenormSpec, SoftmaxMixSpec),
                                                  layer=layer_norm_op,
                                                  masked_layer=masked_layer_op)
