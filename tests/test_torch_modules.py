"""torch's own ModuleInfo samples for the torch.nn norms, run through normkit's namesakes.

Every sample of ``torch.testing._internal.common_modules.module_db`` for BatchNorm1d/2d/3d,
GroupNorm, LayerNorm and InstanceNorm1d/2d/3d (constructor arguments and inputs exactly as
torch's ``test/test_modules.py`` uses them) is built twice, as the torch.nn class and as
normkit's subclass of it (``common_layers.TORCH_NAMESAKES``) holding the same state, and the
checks of ``test_modules.py`` that apply on a CPU compare the two on every backend: forward
in train and eval, gradients, running statistics, state_dict both ways, pickle, non-contiguous
and channels_last inputs, factory kwargs, the meta device, functional_call,
gradcheck/gradgradcheck with batched gradients, vmap, and torch's error inputs.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from common_layers import TORCH_NAMESAKES
from torch import nn
from torch.testing._internal.common_modules import module_db

# importing torch's test utilities freezes torch.backends flags for the whole process
# (torch.backends.disable_global_flags, which has no public inverse); other tests set them
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

MODULE_INFOS = [info for info in module_db if info.module_cls in TORCH_NAMESAKES]


def _samples(training: bool) -> list:
    # torch seeds its generator at random per process: collect the same samples every run
    torch.manual_seed(0)
    out = []
    for info in MODULE_INFOS:
        for sample in info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                              training=training):
            out.append(pytest.param(info, sample, id=f"{info.name}-{sample.desc or 'default'}"))
    return out


TRAIN_SAMPLES = _samples(True)
# gradients need something to differentiate (torch's zero_batch rows have no element)
NONEMPTY_SAMPLES = [p for p in TRAIN_SAMPLES if all(a.numel() for a in p.values[1].forward_input.args)]


def _error_samples() -> list:
    torch.manual_seed(0)
    out = []
    for info in MODULE_INFOS:
        if info.module_error_inputs_func is None:
            continue
        errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False,
                                               training=True)
        out += [pytest.param(info, e, id=f"{info.name}-{i}") for i, e in enumerate(errors)]
    return out


def _inputs(sample, dtype=torch.float64) -> list:
    return [a.detach().to(dtype).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in sample.forward_input.args]


def _pair(info, sample, training: bool, dtype=torch.float64) -> tuple[nn.Module, nn.Module]:
    """(torch.nn layer, normkit layer) built from the sample's arguments with the same random
    parameters and running statistics."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    reference = info.module_cls(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
        if getattr(reference, "running_mean", None) is not None:
            reference.running_mean.uniform_(-1, 1)
            reference.running_var.uniform_(0.5, 2)
    ours = TORCH_NAMESAKES[info.module_cls](*args, **kwargs).to(dtype)
    assert isinstance(ours, info.module_cls)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.train(training), ours.train(training)


def _tolerance(dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def _assert_close_as_sums(actual, expected, dtype) -> None:
    """Gradients of the affine parameters and of a layer's input are sums over the reduced
    elements: in float32 an element near zero carries the rounding of terms as large as the
    tensor's largest entry, so the absolute tolerance scales with that entry (16 ulps of it)."""
    tolerance = _tolerance(dtype)
    if dtype == torch.float32:
        tolerance["atol"] = max(tolerance["atol"], 16 * torch.finfo(dtype).eps * expected.abs().max().item())
    torch.testing.assert_close(actual, expected, **tolerance)


def _assert_same_state(reference: nn.Module, ours: nn.Module, dtype=torch.float64) -> None:
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, **_tolerance(dtype), msg=key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info, sample", TRAIN_SAMPLES)
def test_forward_backward_and_running_stats(info, sample, training, dtype, backend):
    reference, ours = _pair(info, sample, training, dtype)
    for step in range(2):  # twice: the second call sees the running statistics the first moved
        xs_ref, xs = _inputs(sample, dtype), _inputs(sample, dtype)
        y_ref, y = reference(*xs_ref), ours(*xs)
        torch.testing.assert_close(y, y_ref, **_tolerance(dtype))
        _assert_same_state(reference, ours, dtype)
    if y_ref.numel() and y_ref.requires_grad:
        grad = torch.randn_like(y_ref)
        y_ref.backward(grad)
        y.backward(grad)
        for a, b in zip(xs, xs_ref):
            _assert_close_as_sums(a.grad, b.grad, dtype)
        for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
            _assert_close_as_sums(p.grad, q.grad, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info, sample", NONEMPTY_SAMPLES)
def test_gradcheck_and_gradgradcheck(info, sample, training, backend):
    _, ours = _pair(info, sample, training)
    xs = _inputs(sample)
    names = [n for n, _ in ours.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in ours.parameters()]

    def fn(*flat):
        return torch.func.functional_call(ours, dict(zip(names, flat[len(xs):])), tuple(flat[: len(xs)]))

    flat = (*xs, *leaves)
    assert torch.autograd.gradcheck(fn, flat, check_batched_grad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, flat, check_batched_grad=True, fast_mode=True)


@pytest.mark.parametrize("info, sample", TRAIN_SAMPLES)
def test_state_dict_both_ways_pickle_and_copy(info, sample):
    reference, ours = _pair(info, sample, True)
    ours(*_inputs(sample))  # move the running statistics, so they are worth carrying
    fresh_torch = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs).double()
    fresh_torch.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(fresh_torch, ours)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    fresh = TORCH_NAMESAKES[info.module_cls](*sample.constructor_input.args, **sample.constructor_input.kwargs)
    fresh.double().load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    _assert_same_state(fresh_torch, fresh)
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert type(clone) is type(ours) and repr(clone) == repr(ours)
        clone.eval()
        ours.eval()
        torch.testing.assert_close(clone(*_inputs(sample)), ours(*_inputs(sample)))
        ours.train()
    assert repr(ours) == repr(reference)


@pytest.mark.parametrize("info, sample", TRAIN_SAMPLES)
def test_non_contiguous_and_channels_last(info, sample, backend):
    reference, ours = _pair(info, sample, False)
    (x,) = _inputs(sample)
    expected = ours(x)
    # torch's test_modules.py makes inputs non-contiguous the same way
    strided = torch.repeat_interleave(x.detach(), 2, dim=-1)[..., ::2]
    assert not strided.is_contiguous() or strided.numel() <= 1
    torch.testing.assert_close(ours(strided), expected, **_tolerance(torch.float64))
    if x.dim() in (4, 5) and x.numel():
        layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x_cl = x.detach().to(memory_format=layout)
        y_cl = ours(x_cl)
        torch.testing.assert_close(y_cl, expected, **_tolerance(torch.float64))
        # test_modules.py wants channels_last out for channels_last in; torch's own InstanceNorm
        # and LayerNorm fail that (expected failures there): at least torch's layout
        assert y_cl.is_contiguous(memory_format=layout) or not reference(x_cl).is_contiguous(memory_format=layout)


@pytest.mark.parametrize("info, sample", TRAIN_SAMPLES)
def test_factory_kwargs_and_meta_device(info, sample):
    cls = TORCH_NAMESAKES[info.module_cls]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    m = cls(*args, **kwargs, device="cpu", dtype=torch.float64)
    t = info.module_cls(*args, **kwargs, device="cpu", dtype=torch.float64)
    assert [(n, p.dtype, p.device) for n, p in m.named_parameters()] == [
        (n, p.dtype, p.device) for n, p in t.named_parameters()]
    assert [(n, b.dtype, b.device) for n, b in m.named_buffers()] == [
        (n, b.dtype, b.device) for n, b in t.named_buffers()]
    meta = cls(*args, **kwargs, device="meta")
    assert all(p.is_meta for p in meta.parameters()) and all(b.is_meta for b in meta.buffers())
    x = _inputs(sample, torch.float32)[0].detach().to("meta")
    meta_torch = info.module_cls(*args, **kwargs, device="meta")
    try:
        y_torch = meta_torch(x)
    except Exception as error:  # momentum=None: the batch count cannot be read on meta
        with pytest.raises(type(error)):
            meta(x)
    else:
        y = meta(x)
        assert y.is_meta and y.shape == y_torch.shape and y.dtype == y_torch.dtype
    meta.to_empty(device="cpu")  # materialising then resetting gives torch's initial state
    meta.reset_parameters()
    materialised = info.module_cls(*args, **kwargs, device="meta")
    materialised.to_empty(device="cpu")
    materialised.reset_parameters()
    _assert_same_state(materialised, meta, torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info, sample", TRAIN_SAMPLES)
def test_functional_call_and_vmap(info, sample, training, backend):
    reference, ours = _pair(info, sample, training)
    (x,) = _inputs(sample)
    params = {n: torch.rand_like(p) + 0.5 for n, p in ours.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(ours, params, (x,)),
                               torch.func.functional_call(reference, params, (x,)))
    stacked = torch.stack([x.detach(), x.detach() * 2 + 1])
    try:
        expected = torch.func.vmap(reference)(stacked)
    except Exception as error:  # torch refuses (in-place running-stat updates under vmap)
        with pytest.raises(type(error)):
            torch.func.vmap(ours)(stacked)
        return
    torch.testing.assert_close(torch.func.vmap(ours)(stacked), expected)


@pytest.mark.parametrize("info, error", _error_samples())
def test_torch_error_inputs(info, error):
    """torch's error inputs raise the same error type with a message torch's regex matches
    (normkit raises at construction what torch raises in forward: see the README)."""
    sample = error.module_error_input
    cls = TORCH_NAMESAKES[info.module_cls]
    with pytest.raises(error.error_type, match=error.error_regex):
        m = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        m(*sample.forward_input.args, **sample.forward_input.kwargs)


@pytest.mark.parametrize("info, sample", TRAIN_SAMPLES)
def test_jit_script_compiles_the_torch_layer(info, sample):
    _, ours = _pair(info, sample, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script itself is deprecated
        scripted = torch.jit.script(ours)
    xs = _inputs(sample)
    ours_copy = copy.deepcopy(ours)
    torch.testing.assert_close(scripted(*xs), ours_copy(*_inputs(sample)))
    _assert_same_state(ours_copy, ours)  # the scripted layer moved normkit's own buffers
