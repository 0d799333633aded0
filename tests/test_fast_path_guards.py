"""Hostile inputs for the three per-call shortcuts of the fused CPU path, and the memory
guards in front of the C kernels:

1. ``MixSpec.__post_init__`` derives ``constant_sources`` / ``tracked`` once, and
   ``reads_running`` reads the spec's codes;
2. ``check_per_channel``: one pass over a call's per-channel tensors, falling back to the
   per-tensor checks on failure;
3. ``ops._update_running_eager``: the eager running update skips the operator's validation
   when the running tensors look fine.

Each shortcut is compared with what it replaced: the old property formulas, the old checks
(``check_vector`` for every tensor, then ``check_param_dtypes``, both unchanged by the commit)
and the validating ``ops._update_running_cpu``; the drop-in layers with ``torch.nn``. Tensors
whose memory C must not touch by shape and strides (freed storage, a lazy negation bit) are
refused before any pointer is taken.
"""

import copy
import dataclasses
import itertools
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import normkit
import normkit.functional as F
from normkit._core import (
    MixSpec,
    RenormSpec,
    SoftmaxMixSpec,
    check_param_dtypes,
    check_per_channel,
    check_vector,
    spec_from_codes,
)

from common_layers import cases

HAS_C = normkit.kernels.load("cpu") is not None
needs_c = pytest.mark.skipif(not HAS_C, reason="the C kernels are not built on this machine")
if HAS_C:
    from normkit.kernels import ops
C = 3


# ---- 1. the spec's derived facts --------------------------------------------------------------

def _old_constant_sources(spec):
    if spec.batch_stats:
        return (False,) * len(spec.sources)
    in_from_running = spec.running == "in" and "bn" not in spec.sources
    return tuple(s == "bn" or (s == "in" and in_from_running) for s in spec.sources)


def _old_tracked(spec):
    if not spec.batch_stats:
        return None
    if "bn" in spec.sources:
        return "bn"
    return "in" if spec.running == "in" and spec.sources == ("in",) else None


def _all_specs():
    names = ("in", "ln", "bn", "gn3")
    for k in (1, 2, 3, 4):
        for sources in itertools.permutations(names, k):
            for batch_stats, running in itertools.product((True, False), ("bn", "in")):
                yield MixSpec(sources, 1e-5, batch_stats, running)
                if k >= 2:
                    yield SoftmaxMixSpec(sources, 1e-3, batch_stats, running)
    yield RenormSpec(("bn",), 1e-5, r_max=3.0, d_max=5.0)


SPECS = list(_all_specs())


def test_derived_facts_match_the_old_formulas_for_every_spec():
    for spec in SPECS:
        const = _old_constant_sources(spec)
        assert spec.constant_sources == const, spec
        assert spec.tracked == _old_tracked(spec), spec
        assert spec.needs_input_moments == (not all(const)), spec
        want_reads = True if type(spec) is RenormSpec else any(const)
        assert spec.reads_running is want_reads, spec
        assert spec.codes[2] == sum(1 << k for k, c in enumerate(const) if c), spec


def test_derived_facts_survive_copy_pickle_replace_and_codes_round_trip():
    for spec in SPECS[::7] + [SPECS[-1]]:
        for other in (copy.copy(spec), copy.deepcopy(spec), pickle.loads(pickle.dumps(spec)),
                      dataclasses.replace(spec)):
            assert other == spec and hash(other) == hash(spec)
            assert (other.constant_sources, other.tracked, other.reads_running, other.codes) == \
                (spec.constant_sources, spec.tracked, spec.reads_running, spec.codes)
    # replace() with another batch_stats re-derives (no stale cached facts)
    train = MixSpec(("in", "bn"), 1e-5)
    evalspec = dataclasses.replace(train, batch_stats=False)
    assert (train.reads_running, train.tracked) == (False, "bn")
    assert (evalspec.reads_running, evalspec.tracked, evalspec.constant_sources) == (True, None, (False, True))
    for spec in SPECS:
        if type(spec) is RenormSpec or spec.running == "in" and spec.sources != ("in",):
            continue
        kinds, groups, mask = spec.codes
        back = spec_from_codes(kinds, groups, mask, spec.eps, softmax=type(spec) is SoftmaxMixSpec)
        assert (back.reads_running, back.constant_sources, back.codes) == \
            (spec.reads_running, spec.constant_sources, spec.codes), spec


def test_hand_built_eval_spec_without_running_stats_is_refused_for_every_reading_layer_row():
    """run() refuses a spec that reads running averages when none are given, for the specs
    each table row's layer builds in eval; the training specs are accepted without them."""
    x = torch.randn(2, 12, 5)
    for case in cases():
        spec_type = SoftmaxMixSpec if len(case.sources) > 1 else MixSpec
        sources = tuple("gn3" if s.startswith("gn") else s for s in case.sources)
        running = "in" if case.kind == "in" else "bn"
        w = torch.full((len(sources),), 0.0) if len(sources) > 1 else None
        evalspec = spec_type(sources, 1e-5, False, running)
        if evalspec.reads_running:
            with pytest.raises(ValueError, match="running_mean and running_var are required"):
                F.run(x, evalspec, None, None, w, w, None, None, 0.1, 1)
        else:
            F.run(x, evalspec, None, None, w, w, None, None, 0.1, 1)
        F.run(x, spec_type(sources, 1e-5, True, running), None, None, w, w, None, None, 0.1, 1)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        F.run(x, RenormSpec(("bn",), 1e-5, r_max=2.0, d_max=1.0), None, None, None, None, None, None, 0.1, 1)


def test_subclass_with_its_own_post_init_still_runs():
    @dataclasses.dataclass(frozen=True)
    class Scaled(MixSpec):
        factor: float = 2.0

        def __post_init__(self):
            if self.factor <= 0:
                raise ValueError("factor must be positive")

        def mix(self, *args, **kwargs):
            mu, scale, shift, tracked = super().mix(*args, **kwargs)
            return mu, scale * self.factor, shift, tracked

    x = torch.randn(4, C, 5, dtype=torch.float64)
    with normkit.use_backend("reference"):
        y = F.run(x, Scaled(("bn",), 1e-5), None, None, None, None, None, None, 0.1, 1)
        torch.testing.assert_close(y, 2 * F.run(x, MixSpec(("bn",), 1e-5), None, None, None, None, None, None, 0.1, 1))


def test_reads_running_follows_a_subclass_constant_sources_override():
    @dataclasses.dataclass(frozen=True)
    class AlwaysRunning(MixSpec):
        @property
        def constant_sources(self):
            return (True,) * len(self.sources)

    spec = AlwaysRunning(("bn",), 1e-5)
    assert spec.reads_running and not spec.needs_input_moments
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        F.run(torch.randn(4, C, 5), spec, None, None, None, None, None, None, 0.1, 1)


# ---- 2. check_per_channel ----------------------------------------------------------------------

def _old_checks(x, size, **tensors):
    """The checks run() made before the one-pass check: every check_vector, then check_param_dtypes."""
    for name, t in tensors.items():
        check_vector(t, name, size, x.device)
    check_param_dtypes(x, **tensors)


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and message are what is compared
        return type(e), str(e)
    return None


def _defects(good):
    yield "ok", good
    yield "long", torch.zeros(C + 1)
    yield "short", torch.zeros(C - 1)
    yield "0d", torch.zeros(())
    yield "2d", torch.zeros(1, C)
    yield "col", torch.zeros(C, 1)
    yield "f64", torch.zeros(C, dtype=torch.float64)
    yield "f32", torch.zeros(C, dtype=torch.float32)
    yield "f16", torch.zeros(C, dtype=torch.float16)
    yield "bf16", torch.zeros(C, dtype=torch.bfloat16)
    yield "int", torch.zeros(C, dtype=torch.long)
    yield "bool", torch.zeros(C, dtype=torch.bool)
    yield "complex", torch.zeros(C, dtype=torch.complex64)
    yield "meta", torch.zeros(C, device="meta")
    yield "meta-int", torch.zeros(C, dtype=torch.long, device="meta")
    yield "meta-long", torch.zeros(C + 2, device="meta")
    yield "sparse", torch.zeros(C).to_sparse()
    yield "noncontig", torch.zeros(2 * C)[::2]
    yield "expanded", torch.zeros(1).expand(C)
    yield "list", [0.0] * C
    yield "grad", torch.zeros(C, requires_grad=True)


NAMES = ("weight", "bias", "running_mean", "running_var")


@pytest.mark.parametrize("xdtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_one_broken_tensor_gives_the_old_checks_outcome(xdtype):
    x = torch.randn(2, C, 4).to(xdtype)
    for slot in NAMES:
        for label, bad in _defects(torch.zeros(C, dtype=xdtype)):
            tensors = {n: torch.zeros(C, dtype=xdtype) for n in NAMES}
            tensors[slot] = bad
            new = _outcome(lambda: check_per_channel(x, C, **tensors))
            old = _outcome(lambda: _old_checks(x, C, **tensors))
            assert new == old, (xdtype, slot, label)
            none = dict(tensors, **{n: None for n in NAMES if n != slot})
            assert _outcome(lambda: check_per_channel(x, C, **none)) == _outcome(lambda: _old_checks(x, C, **none))


def test_reduced_precision_rule_is_kept():
    h = torch.randn(2, C, 4, dtype=torch.float16)
    check_per_channel(h, C, weight=torch.ones(C), bias=torch.zeros(C, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"mixed dtype: bias is torch.bfloat16 but the input is torch.float16 "
                       r"\(expected torch.float16 or torch.float32\)"):
        check_per_channel(h, C, weight=torch.ones(C), bias=torch.zeros(C, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="mixed dtype: weight is torch.float32 but the input is torch.float64"):
        check_per_channel(h.double(), C, weight=torch.ones(C))


def test_two_broken_tensors_keep_the_old_error():
    x = torch.randn(4, C, 5)
    ref = nn.BatchNorm1d(C)
    ref.weight = nn.Parameter(torch.ones(C, dtype=torch.float64))
    ref.running_mean = torch.zeros(C + 1)
    with pytest.raises(RuntimeError, match=f"running_mean should contain {C} elements not {C + 1}"):
        ref(x)
    bn = normkit.BatchNorm1d(C)
    bn.weight = nn.Parameter(torch.ones(C, dtype=torch.float64))
    bn.running_mean = torch.zeros(C + 1)
    with pytest.raises(RuntimeError, match=f"running_mean should contain {C} elements not {C + 1}"):
        bn(x)


# ---- 3. the eager running update ---------------------------------------------------------------

def _fresh_stats(x, spec):
    kinds, groups, mask = spec.codes
    renorm = [spec.r_max, spec.d_max] if type(spec) is RenormSpec else None
    rm, rv = (torch.zeros(C, dtype=ops.stat_dtype(x.dtype)), torch.ones(C, dtype=ops.stat_dtype(x.dtype))) \
        if renorm else (None, None)
    w = torch.full((len(kinds),), 1.0 / len(kinds), dtype=torch.float64) if len(kinds) > 1 else None
    _, stats = ops._layer_forward_cpu(x, None, None, w, w, rm, rv, kinds, groups, mask, float(spec.eps), 1, renorm)
    return stats


def _running_variants(dtype):
    yield "plain", lambda: (torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5)
    yield "views", lambda: (torch.randn(3 * C, dtype=dtype)[C:2 * C], torch.rand(C + 2, dtype=dtype)[1:C + 1] + 1)
    yield "same", lambda: (lambda t: (t, t))(torch.rand(C, dtype=dtype))
    yield "long", lambda: (torch.zeros(C + 1, dtype=dtype), torch.ones(C, dtype=dtype))
    yield "short-var", lambda: (torch.zeros(C, dtype=dtype), torch.ones(C - 1, dtype=dtype))
    yield "0d", lambda: (torch.zeros((), dtype=dtype), torch.ones(C, dtype=dtype))
    yield "row", lambda: (torch.zeros(1, C, dtype=dtype), torch.ones(C, dtype=dtype))
    yield "col-var", lambda: (torch.zeros(C, dtype=dtype), torch.ones(C, 1, dtype=dtype))
    yield "meta", lambda: (torch.zeros(C, dtype=dtype, device="meta"), torch.ones(C, dtype=dtype))
    yield "meta-var", lambda: (torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype, device="meta"))
    yield "grad", lambda: (torch.zeros(C, dtype=dtype, requires_grad=True), torch.ones(C, dtype=dtype))
    yield "grad-var", lambda: (torch.zeros(C, dtype=dtype), nn.Parameter(torch.ones(C, dtype=dtype)))


MOMENTA = (0.1, 0.0, 1.0, 0.5, -0.0, float("nan"), float("inf"), float("-inf"), -1e-9, 1.0 + 1e-12)
UPDATE_SPECS = [MixSpec(("bn",), 1e-5), MixSpec(("in", "ln", "bn"), 1e-5), MixSpec(("in",), 1e-5, True, "in"),
                RenormSpec(("bn",), 1e-5, r_max=2.0, d_max=0.5)]


@needs_c
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float64, torch.bfloat16])
def test_eager_update_equals_the_validating_update(xdtype):
    """Same values (bit for bit) or the same error, tensors untouched on error, version
    counters bumped alike, for every spec the operator tracks."""
    torch.manual_seed(3)
    x = (torch.randn(4, C, 6) * 2 + 1).to(xdtype)
    n, length = 4, 6
    for spec in UPDATE_SPECS:
        track = ops._RENORM_TRACK if type(spec) is RenormSpec else ops._TRACK[spec.tracked]
        stats = _fresh_stats(x, spec)
        for (label, make), momentum in itertools.product(_running_variants(stats.dtype), MOMENTA):
            got = []
            for fn in (ops._update_running_eager, ops._update_running_cpu):
                torch.manual_seed(5)
                rm, rv = make()
                before = [t.detach().clone() for t in (rm, rv)] if rm.device.type == "cpu" and \
                    rv.device.type == "cpu" else None
                versions = (rm._version, rv._version)
                outcome = _outcome(lambda: fn(rm, rv, stats, n, C, length, track, momentum, float(spec.eps)))
                if outcome is not None and before is not None:
                    assert torch.equal(rm.detach(), before[0]) and torch.equal(rv.detach(), before[1])
                values = None if before is None else [t.detach().clone() for t in (rm, rv)]
                got.append((outcome, values, (rm._version - versions[0], rv._version - versions[1])))
            (o1, v1, c1), (o2, v2, c2) = got
            assert o1 == o2 and c1 == c2, (spec, label, momentum, o1, o2)
            if v1 is not None:
                assert all(torch.equal(a, b) for a, b in zip(v1, v2)), (spec, label, momentum)


@needs_c
def test_eager_update_refuses_what_normalize_passes_it():
    """normalize() (public, its arguments "already validated") hands the running tensors to
    the update unchecked: the shortcut's fallback must still raise the validator's error and
    leave them as they were."""
    x = torch.randn(4, C, 5)
    spec = MixSpec(("bn",), 1e-5)
    for make, momentum, err, match in (
        (lambda: (torch.zeros(C + 1), torch.ones(C)), 0.1, ValueError, r"running_mean must be a contiguous CPU "
         r"torch.float32 tensor of shape \(3,\), got a contiguous cpu torch.float32 tensor of shape \(4,\)"),
        (lambda: (torch.zeros(C), torch.ones(())), 0.1, ValueError, r"running_var .* of shape \(\)"),
        (lambda: (torch.zeros(1, C), torch.ones(C)), 0.1, ValueError, r"of shape \(1, 3\)"),
        (lambda: (torch.zeros(C, device="meta"), torch.ones(C)), 0.1, ValueError, "got a contiguous meta"),
        (lambda: (torch.zeros(C), torch.ones(C, requires_grad=True)), 0.1, RuntimeError, "must not require grad"),
        (lambda: (torch.zeros(C), torch.ones(C)), float("nan"), ValueError, r"momentum must be in \[0, 1\], got nan"),
        (lambda: (torch.zeros(C), torch.ones(C)), 1.5, ValueError, r"momentum must be in \[0, 1\], got 1.5"),
        (lambda: (torch.zeros(C), torch.ones(C)), -0.25, ValueError, r"momentum must be in \[0, 1\]"),
    ):
        rm, rv = make()
        before = [t.detach().clone() if t.device.type == "cpu" else None for t in (rm, rv)]
        with pytest.raises(err, match=match):
            F.normalize(x, spec, None, None, None, None, rm, rv, momentum, 1)
        for t, b in zip((rm, rv), before):
            if b is not None:
                assert torch.equal(t.detach(), b)


@needs_c
def test_eager_update_refuses_a_non_strided_running_tensor():
    x = torch.randn(4, C, 5)
    rm, rv = torch.zeros(C).to_mkldnn(), torch.ones(C).to_mkldnn()
    with pytest.raises(ValueError, match="running_mean must be a contiguous CPU torch.float32 tensor"):
        F.normalize(x, MixSpec(("bn",), 1e-5), None, None, None, None, rm, rv, 0.1, 1)


@needs_c
def test_layer_training_takes_the_shortcut_and_matches_the_reference(monkeypatch):
    """Every table row with running statistics (and Batch Renorm): the fused path with the
    eager update (the validator is not called: the shortcut is what runs) gives the
    reference path's outputs and running statistics over several steps."""
    calls = []
    real = ops._validate_update
    monkeypatch.setattr(ops, "_validate_update", lambda *a: (calls.append(1), real(*a))[1])
    rows = cases(running=True) + cases(kind="brn")
    assert rows
    for case in rows:
        for dtype in (torch.float32, torch.float64):
            results = []
            for be in ("auto", "reference"):
                torch.manual_seed(11)
                m = case.make(**({"track_running_stats": True} if case.kind == "in" else {})).to(dtype).train()
                xs = [torch.randn(case.shape, dtype=dtype) * 3 + 1 for _ in range(3)]
                with normkit.use_backend(be):
                    ys = [m(x) for x in xs]
                results.append((ys, m.running_mean.clone(), m.running_var.clone()))
            (ya, ma, va), (yr, mr, vr) = results
            for a, r in zip(ya, yr):
                torch.testing.assert_close(a, r)
            torch.testing.assert_close(ma, mr)
            torch.testing.assert_close(va, vr)
    assert not calls  # the fused eager path never called the operator's validation


@needs_c
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("cls", ["BatchNorm2d", "InstanceNorm2d"])
def test_dropin_running_stats_match_torch(cls, momentum):
    kw = {"track_running_stats": True, "affine": True} if cls == "InstanceNorm2d" else {}
    ours, ref = getattr(normkit, cls)(C, momentum=momentum, **kw), getattr(nn, cls)(C, momentum=momentum, **kw)
    for step in range(4):
        x = torch.randn(5, C, 3, 4) * (step + 1) + step
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@needs_c
def test_swapped_buffers_match_torch_and_writes_stay_in_the_view():
    """Buffers replaced after construction: views into larger tensors (the update must
    write only their C elements), non-contiguous ones, float64 after .to(float64),
    and a parametrized weight."""
    def run_both(mutate, dtype=torch.float32, steps=3):
        ours, ref = normkit.BatchNorm2d(C), nn.BatchNorm2d(C)
        for m in (ours, ref):
            mutate(m)
            m.to(dtype)
        for _ in range(steps):
            x = torch.randn(4, C, 2, 3, dtype=dtype) * 2 - 1
            torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        return ours

    backing = {}

    def into_views(m):
        buf = torch.full((3 * C + 2,), -7.0)
        backing[id(m)] = buf
        m.running_mean, m.running_var = buf[1:1 + C], buf[2 + C:2 + 2 * C]
        m.running_var.fill_(1.0)

    ours = run_both(into_views)
    buf = backing[id(ours)]
    assert buf[0] == -7.0 and buf[1 + C] == -7.0 and (buf[2 + 2 * C:] == -7.0).all()
    assert ours.running_mean.data_ptr() == buf[1:].data_ptr()  # updated in place, not replaced
    run_both(lambda m: setattr(m, "running_mean", torch.zeros(2 * C)[::2]))
    run_both(lambda m: None, dtype=torch.float64)

    class Positive(nn.Module):
        def forward(self, w):
            return w.abs() + 0.5

    def parametrize(m):
        with torch.no_grad():
            m.weight.copy_(torch.tensor([-1.5, 0.25, 2.0]))
        nn.utils.parametrize.register_parametrization(m, "weight", Positive())

    run_both(parametrize)


@needs_c
def test_version_counters_and_autograd_after_the_eager_update():
    """The eager update bumps each running buffer's version once per training call (as
    the operator did), so autograd refuses a graph that saved the old values."""
    bn = normkit.BatchNorm1d(C)
    x = torch.randn(6, C, requires_grad=True)
    v = (bn.running_mean._version, bn.running_var._version)
    bn(x).sum().backward()
    assert (bn.running_mean._version - v[0], bn.running_var._version - v[1]) == (1, 1)
    saved = bn.running_mean * torch.ones(C, requires_grad=True)  # mul saves running_mean
    bn(torch.randn(6, C))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@needs_c
def test_momentum_set_past_the_setter_is_refused():
    """The setter refuses a momentum outside [0, 1]; one written past it (``__dict__``) is
    still refused by the eager update's fallback, and the buffers keep their values."""
    bn = normkit.BatchNorm1d(C)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        bn.momentum = float("nan")
    for bad in (float("nan"), 2.0, -0.5, float("inf")):
        bn.__dict__["momentum"] = bad
        before = bn.running_mean.clone()
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            bn(torch.randn(4, C))
        assert torch.equal(bn.running_mean, before)


@needs_c
def test_freed_running_storage_raises_instead_of_crashing():
    script = textwrap.dedent("""
        import torch, normkit
        bn = normkit.BatchNorm1d(3)
        bn.running_mean.untyped_storage().resize_(0)
        try:
            bn(torch.randn(4, 3))
        except ValueError as e:
            print("raised", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "raised" in done.stdout, (done.returncode, done.stderr[-500:])
    assert "freed or resized storage" in done.stdout


@needs_c
def test_negative_bit_tensors_are_refused_before_c():
    """C reads raw memory and would not see a lazy negation bit: such a tensor is refused
    (parameters and running statistics; an input is resolved on its way) instead of giving wrong numbers."""
    x = torch.randn(4, C, 5)
    neg = torch._neg_view(torch.ones(C))  # -1, stored as +1 with the neg bit
    assert neg.is_neg() and neg.is_contiguous()
    with pytest.raises(ValueError, match="running_mean cannot reach the C kernels: it carries a lazy negation bit"):
        F.run(x, MixSpec(("bn",), 1e-5), None, None, None, None, neg, torch.ones(C), 0.1, 1)
    with pytest.raises(ValueError, match="weight cannot reach the C kernels: it carries a lazy negation bit"):
        F.run(x, MixSpec(("bn",), 1e-5), neg, None, None, None, torch.zeros(C), torch.ones(C), 0.1, 1)
    # an input with the bit never reaches C as is: the result honours it
    y = F.run(torch._neg_view(-x), MixSpec(("bn",), 1e-5), None, None, None, None, torch.zeros(C), torch.ones(C),
              0.1, 1)
    torch.testing.assert_close(y, nn.functional.batch_norm(x, torch.zeros(C), torch.ones(C), training=True))
