"""Hostile inputs: wrong shapes, dtypes, devices, strides and values must raise cleanly
(ValueError / RuntimeError / TypeError), never crash the process or read out of bounds.

Every probe runs in a subprocess (a few processes in all, many probes each), so a segfault
or abort shows up as a negative return code instead of killing the test run. Each probe
is a Python expression evaluated in a prepared namespace; the child prints, per probe,
``OK`` or the exception type and message, and the tests check them against expectations.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("reference", "aten", "auto")

# The child process: defines helpers, evaluates each probe (under each backend when asked).
_CHILD = r'''
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
from torch import nn
import normkit
import normkit.kernels.ops
from normkit import functional as F
op = torch.ops.normkit
D = torch.float64
M = lambda *s, **k: torch.zeros(*s, device="meta", **k)

def X(*s):
    return torch.randn(*(s or (2, 4, 3)))

def lf(x=None, w=None, b=None, mw=None, vw=None, rm=None, rv=None, kinds=(2,), groups=(1,), cm=0, eps=1e-5, axis=1):
    x = X() if x is None else x
    return op.layer_forward(x, w, b, mw, vw, rm, rv, list(kinds), list(groups), cm, eps, axis)

def lb(dy=None, x=None, stats=None, w=None, mw=None, vw=None, rm=None, rv=None, kinds=(2,), groups=(1,), cm=0,
       eps=1e-5, axis=1, om=(True,) * 5):
    x = X() if x is None else x
    if stats is None:
        stats = op.layer_forward(x, None, None, None, None, None, None, [2], [1], 0, 1e-5, 1)[1]
    dy = torch.randn_like(x) if dy is None else dy
    return op.layer_backward(dy, x, stats, w, mw, vw, rm, rv, list(kinds), list(groups), cm, eps, axis, list(om))

def ur(rm=None, rv=None, stats=None, n=2, c=4, l=3, track=1, mom=0.1, eps=None):
    rm = torch.zeros(4) if rm is None else rm
    rv = torch.ones(4) if rv is None else rv
    stats = torch.zeros(44) if stats is None else stats
    if eps is None:  # the schema's default
        op.update_running_(rm, rv, stats, n, c, l, track, mom)
    else:
        op.update_running_(rm, rv, stats, n, c, l, track, mom, eps)
    return rm, rv

def sn(**kw):
    a = dict(running_mean=torch.zeros(4), running_var=torch.ones(4), weight=torch.ones(4), bias=torch.zeros(4),
             mean_logits=torch.zeros(3), var_logits=torch.zeros(3), training=True)
    x = kw.pop("x", None)
    a.update(kw)
    x = X() if x is None else x
    return F.switch_norm(x, a.pop("running_mean"), a.pop("running_var"), a.pop("weight"), a.pop("bias"),
                         a.pop("mean_logits"), a.pop("var_logits"), **a)

def mod(cls, *args, x=None, train=True, **attrs):
    kw = attrs.pop("kw", {})
    m = cls(*args, **kw)
    for name, value in attrs.items():
        if isinstance(getattr(m, name, None), nn.Parameter) and isinstance(value, torch.Tensor):
            value = nn.Parameter(value, requires_grad=value.is_floating_point())
        setattr(m, name, value)
    m.train(train)
    return m(torch.randn(2, 4, 3, 5) if x is None else x)

def bwd(y, *leaves):
    y.backward(torch.ones((), dtype=y.dtype).expand(y.shape))  # a stride-0 gradient
    return [t.grad for t in leaves]

probes, backends = json.loads(sys.stdin.read())
out = {}
for name, expr in probes.items():
    for b in backends or [None]:
        key = name if b is None else f"{name}[{b}]"
        print("START", key, file=sys.stderr, flush=True)
        try:
            if b is None:
                r = eval(expr)
            else:
                with normkit.use_backend(b):
                    r = eval(expr)
            if isinstance(r, torch.Tensor) and r.device.type != "meta" and r.is_floating_point() and r.numel():
                r = r.detach()
                assert not (r.abs() > 1e30).any() or r.isinf().any(), "implausibly large values (garbage?)"
            out[key] = ["OK", ""]
        except Exception as e:
            # every class the error is (normkit's InputError is a ValueError and a RuntimeError)
            out[key] = [" ".join(c.__name__ for c in type(e).__mro__), str(e)]
print(json.dumps(out))
'''


def _run_child(probes: dict[str, str], backends: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NORMKIT_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps([probes, list(backends or [])]), capture_output=True,
        text=True, cwd=ROOT, env=env, timeout=120,
    )
    last = [line for line in proc.stderr.splitlines() if line.startswith("START")][-1:]
    assert proc.returncode == 0, f"child crashed (rc={proc.returncode}) at {last}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# name -> (expression, expected exception type or "OK", regex the message must match)
VE, RE_, TE = "ValueError", "RuntimeError", "TypeError"
_SHAPE = r"must be a contiguous CPU torch\.float(32|64) tensor of shape"

RAW = {
    # layer_forward: small tensors
    "lf_ok": ("lf()", "OK", ""),
    "lf_w_short": ("lf(w=torch.ones(3))", VE, r"weight " + _SHAPE + r" \(4,\)"),
    "lf_w_long": ("lf(w=torch.ones(5))", VE, "weight " + _SHAPE),
    "lf_w_2d": ("lf(w=torch.ones(1, 4))", VE, "weight " + _SHAPE),
    "lf_w_scalar": ("lf(w=torch.tensor(1.0))", VE, "weight " + _SHAPE),
    "lf_w_f64": ("lf(w=torch.ones(4, dtype=D))", VE, "weight " + _SHAPE),
    "lf_w_int": ("lf(w=torch.ones(4, dtype=torch.int32))", VE, "weight " + _SHAPE),
    "lf_w_noncontig": ("lf(w=torch.ones(8)[::2])", VE, "got a non-contiguous"),
    "lf_w_expanded": ("lf(w=torch.ones(1).expand(4))", VE, "got a non-contiguous"),
    "lf_w_sparse": ("lf(w=torch.ones(4).to_sparse())", "NotImplementedError", "SparseCPU"),
    "lf_b_short": ("lf(b=torch.ones(1))", VE, "bias " + _SHAPE),
    "lf_x_f64_w_f32": ("lf(x=X().double(), w=torch.ones(4))", VE, "weight must be a contiguous CPU torch.float64"),
    "lf_x_f16_w_f16": ("lf(x=X().half(), w=torch.ones(4).half())", VE, "weight must be a contiguous CPU torch.float32"),
    "lf_rm_short": ("lf(rm=torch.zeros(1), rv=torch.ones(4), cm=1)", VE, "running_mean " + _SHAPE),
    "lf_rv_short": ("lf(rm=torch.zeros(4), rv=torch.ones(1), cm=1)", VE, "running_var " + _SHAPE),
    "lf_rm_f64": ("lf(rm=torch.zeros(4, dtype=D), rv=torch.ones(4), cm=1)", VE, "running_mean " + _SHAPE),
    "lf_rm_missing": ("lf(cm=1)", VE, "running_mean and running_var are required"),
    "lf_rm_alias": ("lf(rm=torch.ones(4), rv=None, cm=1)", VE, "required"),
    "lf_rm_is_rv": ("(lambda r: lf(rm=r, rv=r, cm=1))(torch.ones(4))", "OK", ""),
    "lf_huge_c_tiny_w": ("lf(x=torch.randn(1, 100000, 1), w=torch.ones(4))", VE, r"shape \(100000,\)"),
    "lf_huge_c_tiny_rm": ("lf(x=torch.randn(1, 100000, 1), rm=torch.zeros(4), rv=torch.ones(4), cm=1)", VE,
                          r"running_mean .*shape \(100000,\)"),
    "lf_huge_c": ("lf(x=torch.randn(1, 100000, 1))", "OK", ""),
    "lf_mw_missing": ("lf(kinds=(0, 1, 2), groups=(1, 1, 1))", VE, r"mean_weights and var_weights of shape \(3,\)"),
    "lf_mw_short": ("lf(kinds=(0, 1, 2), groups=(1, 1, 1), mw=torch.ones(2, dtype=D), vw=torch.ones(3, dtype=D))",
                    VE, "mean_weights " + _SHAPE),
    "lf_mw_f32": ("lf(kinds=(0, 1, 2), groups=(1, 1, 1), mw=torch.ones(3), vw=torch.ones(3, dtype=D))", VE,
                  "mean_weights must be a contiguous CPU torch.float64"),
    "lf_vw_short": ("lf(kinds=(0, 1, 2), groups=(1, 1, 1), mw=torch.ones(3, dtype=D), vw=torch.ones(1, dtype=D))",
                    VE, "var_weights " + _SHAPE),
    # layer_forward: int lists, eps, axis
    "lf_kinds_empty": ("lf(kinds=(), groups=())", VE, r"same length in \[1, 16\]"),
    "lf_kinds_17": ("lf(kinds=(0,) * 17, groups=(1,) * 17, mw=torch.ones(17, dtype=D), vw=torch.ones(17, dtype=D))",
                    VE, r"same length in \[1, 16\]"),
    "lf_kinds_16": ("lf(kinds=(0,) * 16, groups=(1,) * 16, mw=torch.ones(16, dtype=D) / 16, "
                    "vw=torch.ones(16, dtype=D) / 16)", "OK", ""),
    "lf_kinds_7": ("lf(kinds=(7,))", VE, "source kinds must be 0"),
    "lf_kinds_neg": ("lf(kinds=(-1,))", VE, "source kinds must be 0"),
    "lf_groups_len": ("lf(kinds=(0, 1), groups=(1,), mw=torch.ones(2, dtype=D), vw=torch.ones(2, dtype=D))", VE,
                      "same length"),
    "lf_groups_zero": ("lf(kinds=(3,), groups=(0,))", VE, "group count 0 of a kind-3 source"),
    "lf_groups_neg": ("lf(kinds=(3,), groups=(-2,))", VE, "group count -2"),
    "lf_groups_nondiv": ("lf(kinds=(3,), groups=(3,))", VE, "group count 3"),
    "lf_groups_gt_c": ("lf(kinds=(3,), groups=(8,))", VE, "group count 8"),
    "lf_groups_huge": ("lf(kinds=(3,), groups=(2 ** 62,))", VE, "group count"),
    "lf_groups_non_gn": ("lf(kinds=(0,), groups=(2,))", VE, "kind-0 source is invalid"),
    "lf_cm_neg": ("lf(cm=-1)", VE, "constant_mask -1"),
    "lf_cm_big": ("lf(cm=2, rm=torch.zeros(4), rv=torch.ones(4))", VE, "constant_mask 2"),
    "lf_cm_huge": ("lf(cm=2 ** 40, rm=torch.zeros(4), rv=torch.ones(4))", VE, "constant_mask"),
    "lf_cm_ln": ("lf(kinds=(1,), cm=1, rm=torch.zeros(4), rv=torch.ones(4))", VE, "only in/bn sources"),
    "lf_eps_zero": ("lf(eps=0.0)", VE, "eps must be finite and > 0"),
    "lf_eps_neg": ("lf(eps=-1.0)", VE, "eps must be finite and > 0"),
    "lf_eps_nan": ("lf(eps=float('nan'))", VE, "eps must be finite and > 0"),
    "lf_eps_inf": ("lf(eps=float('inf'))", VE, "eps must be finite and > 0"),
    "lf_axis_0": ("lf(axis=0)", VE, r"axis must be a channel axis in \[1, 2\]"),
    "lf_axis_neg": ("lf(axis=-1)", VE, "axis must be a channel axis"),
    "lf_axis_3": ("lf(axis=3)", VE, "axis must be a channel axis"),
    "lf_axis_huge": ("lf(axis=2 ** 40)", VE, "axis must be a channel axis"),
    "lf_axis_2": ("lf(axis=2)", "OK", ""),
    # layer_forward: x
    "lf_x_1d": ("lf(x=torch.randn(4))", VE, "axis must be a channel axis"),
    "lf_x_0d": ("lf(x=torch.tensor(1.0))", VE, "axis must be a channel axis"),
    "lf_x_int": ("lf(x=torch.ones(2, 4, 3, dtype=torch.int32))", VE, "dtype torch.int32 is not one of"),
    "lf_x_complex": ("lf(x=torch.ones(2, 4, 3, dtype=torch.complex64))", VE, "dtype torch.complex64"),
    "lf_x_n0": ("lf(x=torch.randn(0, 4, 3))", VE, "empty input"),
    "lf_x_l0": ("lf(x=torch.randn(2, 4, 0))", VE, "empty input"),
    "lf_x_c0": ("lf(x=torch.randn(2, 0, 3))", VE, "empty input"),
    "lf_x_expanded_n": ("lf(x=torch.randn(1, 4, 3).expand(2, 4, 3))", VE, "neither channels-first nor channels-last"),
    "lf_x_expanded_l": ("lf(x=torch.randn(2, 4, 1).expand(2, 4, 3))", VE, "neither channels-first"),
    "lf_x_overlap": ("lf(x=torch.randn(20).as_strided((2, 4, 3), (1, 1, 1)))", VE, "neither channels-first"),
    "lf_x_overlap2": ("lf(x=torch.randn(20).as_strided((2, 4, 3), (3, 3, 1)))", VE, "neither channels-first"),
    "lf_x_sliced": ("lf(x=torch.randn(2, 8, 3)[:, ::2])", VE, "neither channels-first"),
    "lf_x_permuted": ("lf(x=torch.randn(3, 4, 2).permute(2, 1, 0))", VE, "neither channels-first"),
    "lf_x_mid_axis": ("lf(x=torch.randn(2, 3, 4, 5), axis=2)", VE, "neither channels-first"),
    "lf_x_transposed": ("lf(x=torch.randn(2, 3, 4).transpose(1, 2))", "OK", ""),
    "lf_x_offset": ("lf(x=torch.randn(100)[50:74].view(2, 4, 3))", "OK", ""),
    "lf_x_channels_last": ("lf(x=torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last))", "OK", ""),
    "lf_x_axis_last": ("lf(x=torch.randn(2, 3, 5, 4), axis=3)", "OK", ""),
    "lf_x_f16": ("lf(x=X().half())", "OK", ""),
    "lf_x_bf16": ("lf(x=X().bfloat16())", "OK", ""),
    "lf_x_nan": ("lf(x=torch.full((2, 4, 3), float('nan')))", "OK", ""),
    "lf_x_neg_view": ("lf(x=torch._neg_view(X()))", "OK", ""),
    "lf_x_grad": ("bwd(lf(x=X().requires_grad_())[0], )", "OK", ""),
    # layer_backward
    "lb_ok": ("lb()", "OK", ""),
    "lb_stats_short": ("lb(stats=torch.zeros(10))", VE, r"stats " + _SHAPE + r" \(44,\)"),
    "lb_stats_long": ("lb(stats=torch.zeros(45))", VE, "stats " + _SHAPE),
    "lb_stats_2d": ("lb(stats=torch.zeros(4, 11))", VE, "stats " + _SHAPE),
    "lb_stats_f64": ("lb(stats=torch.zeros(44, dtype=D))", VE, "stats " + _SHAPE),
    "lb_stats_f16": ("lb(stats=torch.zeros(44, dtype=torch.float16))", VE, "stats " + _SHAPE),
    "lb_stats_noncontig": ("lb(stats=torch.zeros(88)[::2])", VE, "non-contiguous"),
    "lb_x_f16_stats_f16": ("lb(x=X().half(), stats=torch.zeros(44, dtype=torch.float16))", VE, "stats " + _SHAPE),
    "lb_dy_shape": ("lb(dy=torch.randn(2, 4, 2))", VE, "dy must be a strided tensor of x's shape"),
    "lb_dy_rank": ("lb(dy=torch.randn(2, 4))", VE, "dy must be a strided tensor of x's shape"),
    "lb_dy_int": ("lb(dy=torch.ones(2, 4, 3, dtype=torch.int64))", VE, "dy must have a floating dtype"),
    "lb_dy_sparse": ("lb(dy=X().to_sparse())", "NotImplementedError", "SparseCPU"),
    "lb_dy_f64": ("lb(dy=torch.randn(2, 4, 3, dtype=D))", "OK", ""),
    "lb_dy_expanded": ("lb(dy=torch.randn(1, 1, 1).expand(2, 4, 3))", "OK", ""),
    "lb_dy_overlap": ("lb(dy=torch.randn(30).as_strided((2, 4, 3), (1, 1, 1)))", "OK", ""),
    "lb_dy_transposed": ("lb(dy=torch.randn(2, 3, 4).transpose(1, 2))", "OK", ""),
    "lb_dy_is_x": ("(lambda x: lb(dy=x, x=x))(X())", "OK", ""),
    "lb_x_cl_dy_cf": ("lb(x=torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last), dy=torch.randn(2, 4, 3, 5))",
                      "OK", ""),
    "lb_om_short": ("lb(om=(True,))", VE, "output_mask must have 5 entries"),
    "lb_om_long": ("lb(om=(True,) * 6)", VE, "output_mask must have 5 entries"),
    "lb_om_none": ("lb(om=(False,) * 5)", "OK", ""),
    "lb_w_short": ("lb(w=torch.ones(3))", VE, "weight " + _SHAPE),
    "lb_w_f64": ("lb(w=torch.ones(4, dtype=D))", VE, "weight " + _SHAPE),
    "lb_mw_missing": ("lb(kinds=(0, 1, 2), groups=(1, 1, 1))", VE, "mean_weights and var_weights"),
    "lb_mw_short": ("lb(kinds=(0, 1, 2), groups=(1, 1, 1), mw=torch.ones(2, dtype=D), vw=torch.ones(3, dtype=D))",
                    VE, "mean_weights " + _SHAPE),
    "lb_kinds_bad": ("lb(kinds=(9,))", VE, "source kinds"),
    "lb_kinds_17": ("lb(kinds=(0,) * 17, groups=(1,) * 17)", VE, "same length"),
    "lb_groups_bad": ("lb(kinds=(3,), groups=(3,))", VE, "group count 3"),
    "lb_cm_no_rm": ("lb(cm=1)", VE, "running_mean and running_var are required"),
    "lb_cm_rm_short": ("lb(cm=1, rm=torch.zeros(2), rv=torch.ones(4))", VE, "running_mean " + _SHAPE),
    "lb_eps_bad": ("lb(eps=0.0)", VE, "eps must be finite"),
    "lb_axis_bad": ("lb(axis=3)", VE, "axis must be a channel axis"),
    "lb_axis_neg": ("lb(axis=-1)", VE, "axis must be a channel axis"),
    "lb_x_bad_layout": ("lb(x=torch.randn(2, 8, 3)[:, ::2], stats=torch.zeros(44))", VE, "neither channels-first"),
    "lb_x_empty": ("lb(x=torch.randn(0, 4, 3), stats=torch.zeros(12))", VE, "empty input"),
    # update_running_
    "ur_ok": ("ur()", "OK", ""),
    "ur_track0": ("ur(track=0)", VE, "track must be 1"),
    "ur_track4": ("ur(track=4)", VE, r"track must be 1 \(bn\), 2 \(in\) or 3 \(renorm\)"),
    "ur_track3_short_stats": ("ur(track=3, eps=1e-5)", VE, r"stats " + _SHAPE + r" \(52,\)"),
    "ur_track3_eps0": ("ur(track=3, stats=torch.zeros(52))", VE, "eps must be finite and > 0 for the renorm update"),
    "ur_track3_eps_nan": ("ur(track=3, stats=torch.zeros(52), eps=float('nan'))", VE, "eps must be finite and > 0"),
    "ur_track3_ok": ("ur(track=3, stats=torch.zeros(52), eps=1e-5)", "OK", ""),
    "ur_n0": ("ur(n=0)", VE, "n, c, length >= 1"),
    "ur_n_neg": ("ur(n=-1)", VE, "n, c, length >= 1"),
    "ur_l0": ("ur(l=0)", VE, "n, c, length >= 1"),
    "ur_c_wrong": ("ur(c=5)", VE, r"stats " + _SHAPE + r" \(55,\)"),
    "ur_n_wrong": ("ur(n=3)", VE, r"stats " + _SHAPE + r" \(60,\)"),
    "ur_n_huge": ("ur(n=2 ** 61)", VE, "stats " + _SHAPE),
    "ur_stats_short": ("ur(stats=torch.zeros(3))", VE, "stats " + _SHAPE),
    "ur_stats_int": ("ur(stats=torch.zeros(44, dtype=torch.int32))", VE, "stats must be a float32 or float64 tensor"),
    "ur_stats_f16": ("ur(stats=torch.zeros(44, dtype=torch.float16))", VE, "stats must be a float32 or float64"),
    "ur_stats_noncontig": ("ur(stats=torch.zeros(88)[::2])", VE, "non-contiguous"),
    "ur_stats_f64_rm_f32": ("ur(stats=torch.zeros(44, dtype=D))", VE, "running_mean must be a contiguous CPU torch.float64"),
    "ur_rm_short": ("ur(rm=torch.zeros(2))", VE, "running_mean " + _SHAPE),
    "ur_rm_f64": ("ur(rm=torch.zeros(4, dtype=D))", VE, "running_mean " + _SHAPE),
    "ur_rm_noncontig": ("ur(rm=torch.zeros(8)[::2])", VE, "non-contiguous"),
    "ur_rm_expanded": ("ur(rm=torch.zeros(1).expand(4))", VE, "non-contiguous"),
    "ur_rv_short": ("ur(rv=torch.ones(3))", VE, "running_var " + _SHAPE),
    "ur_alias": ("(lambda r: ur(rm=r, rv=r))(torch.zeros(4))", "OK", ""),
    "ur_alias_stats": ("(lambda s: op.update_running_(s[:4], s[4:8], s, 2, 4, 3, 1, 0.1))(torch.zeros(44))", "OK", ""),
    "ur_mom_neg": ("ur(mom=-0.5)", VE, r"momentum must be in \[0, 1\]"),
    "ur_mom_big": ("ur(mom=1.5)", VE, r"momentum must be in \[0, 1\]"),
    "ur_mom_nan": ("ur(mom=float('nan'))", VE, "momentum must be in"),
    "ur_mom_inf": ("ur(mom=float('inf'))", VE, "momentum must be in"),
    "ur_track2": ("ur(track=2)", "OK", ""),
    # the pass kernels with wrong-shaped or wrong-device small tensors
    "pass_apply_mu_meta": ("normkit.kernels.ops.CPU_KERNELS.apply(X(), torch.zeros(2, 4, device='meta'), "
                           "torch.ones(2, 4), torch.zeros(4), 1)", VE, "mu must be a floating-point CPU tensor"),
    "pass_apply_scale_meta": ("normkit.kernels.ops.CPU_KERNELS.apply(X(), torch.zeros(2, 4), "
                              "torch.ones(2, 4, device='meta'), torch.zeros(4), 1)", VE, "scale must be"),
    "pass_reduce_mean_meta": ("normkit.kernels.ops.CPU_KERNELS.reduce(X(), X(), torch.zeros(2, 4, device='meta'), 1)",
                              VE, "mean must be a floating-point CPU tensor"),
    "pass_bapply_q_meta": ("normkit.kernels.ops.CPU_KERNELS.backward_apply(X(), X(), torch.zeros(2, 4), "
                           "torch.ones(2, 4), torch.zeros(2, 4), torch.zeros(2, 4, device='meta'), 1)", VE,
                           "q must be a floating-point CPU tensor"),
    "op_forward_weight_meta": ("torch.ops.normkit.layer_forward(X(), torch.ones(4, device='meta'), None, None, None, "
                               "None, None, [2], [1], 0, 1e-5, 1)", VE, "weight must be on the input's device"),
    "pass_apply_mu_big": ("normkit.kernels.ops.CPU_KERNELS.apply(X(), torch.zeros(2, 5), torch.ones(2, 4), "
                          "torch.zeros(4), 1)", VE, "mu must broadcast to"),
    "pass_apply_shift_short": ("normkit.kernels.ops.CPU_KERNELS.apply(X(), torch.zeros(2, 4), torch.ones(2, 4), "
                               "torch.zeros(3), 1)", VE, "shift " + _SHAPE),
    "pass_apply_shift_meta": ("normkit.kernels.ops.CPU_KERNELS.apply(X(), torch.zeros(2, 4), torch.ones(2, 4), "
                              "M(4), 1)", VE, "shift must be a contiguous CPU"),
    "pass_moments_bad_layout": ("normkit.kernels.ops.CPU_KERNELS.moments(torch.randn(2, 8, 3)[:, ::2], 1)", VE,
                                "neither channels-first"),
    "pass_reduce_dy_bad": ("normkit.kernels.ops.CPU_KERNELS.reduce(torch.randn(2, 4), X(), torch.zeros(2, 4), 1)",
                           VE, "dy must be a strided tensor"),
    "pass_reduce_mean_big": ("normkit.kernels.ops.CPU_KERNELS.reduce(X(), X(), torch.zeros(3, 4), 1)", VE,
                             "mean must broadcast to"),
    "pass_bapply_p_big": ("normkit.kernels.ops.CPU_KERNELS.backward_apply(X(), X(), torch.zeros(2, 4), "
                          "torch.ones(2, 4), torch.zeros(2, 5), torch.zeros(2, 4), 1)", VE, "p must broadcast to"),
}

_VEC = r"should contain 4 elements not {} \(expected shape \(4,\)"
FUNCTIONAL = {
    "sn_ok": ("sn()", "OK", ""),
    "sn_eval": ("sn(training=False)", "OK", ""),
    "sn_w_short": ("sn(weight=torch.ones(3))", VE, "weight " + _VEC.format(3)),
    "sn_w_2d": ("sn(weight=torch.ones(2, 2))", VE, r"weight should contain 4 elements .*got shape \(2, 2\)"),
    "sn_w_int": ("sn(weight=torch.ones(4, dtype=torch.int64))", VE, "weight must be a floating-point tensor"),
    "sn_w_meta": ("sn(weight=M(4))", VE, "weight is on meta but the input is on cpu"),
    "sn_w_list": ("sn(weight=[1.0] * 4)", TE, "weight must be a torch.Tensor or None"),
    "sn_w_noncontig": ("sn(weight=torch.ones(8)[::2])", "OK", ""),
    "sn_w_expanded": ("sn(weight=torch.ones(1).expand(4))", "OK", ""),
    "sn_w_f16": ("sn(weight=torch.ones(4).half())", VE, "mixed dtype"),
    "sn_b_long": ("sn(bias=torch.ones(5))", VE, "bias " + _VEC.format(5)),
    "sn_rm_short": ("sn(running_mean=torch.zeros(3))", VE, "running_mean " + _VEC.format(3)),
    "sn_rv_short_eval": ("sn(running_var=torch.ones(3), training=False)", VE, "running_var " + _VEC.format(3)),
    "sn_rv_none_eval": ("sn(running_var=None, training=False)", VE, "running_var is required"),
    "sn_rm_int": ("sn(running_mean=torch.zeros(4, dtype=torch.int64))", VE, "running_mean must be a floating-point"),
    "sn_rm_meta": ("sn(running_mean=M(4))", VE, "running_mean is on meta"),
    "sn_rm_f64": ("sn(running_mean=torch.zeros(4, dtype=D), running_var=torch.ones(4, dtype=D))", VE, "mixed dtype"),
    "sn_rm_noncontig": ("sn(running_mean=torch.zeros(8)[::2], running_var=torch.ones(8)[::2])", "OK", ""),
    "sn_rm_expanded": ("sn(running_mean=torch.zeros(1).expand(4), running_var=torch.ones(1).expand(4))", RE_,
                       "more than one element of the written-to tensor"),
    "sn_rm_is_rv": ("(lambda r: sn(running_mean=r, running_var=r))(torch.ones(4))", "OK", ""),
    "sn_logits_short": ("sn(mean_logits=torch.zeros(2))", VE, r"mean_logits must have shape \(3,\)"),
    "sn_logits_2d": ("sn(var_logits=torch.zeros(1, 3))", VE, r"var_logits must have shape \(3,\)"),
    "sn_logits_none": ("sn(var_logits=None)", VE, r"var_logits must have shape \(3,\).*got None"),
    "sn_logits_int": ("sn(mean_logits=torch.zeros(3, dtype=torch.int64))", VE, "mean_logits must be a floating-point"),
    "sn_logits_meta": ("sn(mean_logits=M(3))", VE, "mean_logits is on meta"),
    "sn_logits_nan": ("sn(mean_logits=torch.tensor([float('nan'), 0.0, 0.0]))", "OK", ""),
    "sn_sources_bad": ("sn(sources=('in', 'zz', 'bn'))", VE, "unknown normalizer source 'zz'"),
    "sn_sources_gn_nondiv": ("sn(sources=('gn3',), mean_logits=None, var_logits=None)", VE,
                             "'gn3' needs a group count that divides"),
    "sn_sources_dup": ("sn(sources=('in', 'in', 'bn'))", VE, "must not repeat"),
    "sn_sources_empty": ("sn(sources=())", VE, "at least one"),
    "sn_sources_6": ("sn(sources=('in', 'ln', 'bn', 'gn1', 'gn2', 'gn4'), mean_logits=torch.zeros(6), "
                     "var_logits=torch.zeros(6))", "OK", ""),
    "sn_eps_zero": ("sn(eps=0.0)", VE, "eps must be positive"),
    "sn_eps_nan": ("sn(eps=float('nan'))", VE, "eps must be positive"),
    "sn_mom_big": ("sn(momentum=1.5)", VE, r"momentum must be in \[0, 1\]"),
    "sn_mom_nan": ("sn(momentum=float('nan'))", VE, r"momentum must be in \[0, 1\]"),
    "sn_axis_bad": ("sn(channel_axis=5)", VE, "axis 5 is out of range for a 3-D input"),
    "sn_axis_last": ("sn(channel_axis=-1, x=torch.randn(2, 3, 4))", "OK", ""),
    "sn_x_int": ("sn(x=torch.ones(2, 4, 3, dtype=torch.int64))", VE, "x must be float16, bfloat16, float32 or float64"),
    "sn_x_1d": ("sn(x=torch.ones(4))", VE, "must have a batch and a channel dim, got a 1-D input"),
    "sn_x_meta": ("sn(x=M(2, 4, 3))", VE, "is on cpu but the input is on meta"),
    "sn_x_n0": ("sn(x=torch.randn(0, 4, 3))", "OK", ""),
    "sn_x_l0": ("sn(x=torch.randn(2, 4, 0))", "OK", ""),
    "sn_x_c0": ("F.switch_norm(torch.randn(2, 0, 3), None, None, None, None, torch.zeros(3), torch.zeros(3), "
                "training=True)", "OK", ""),
    "sn_x_expanded": ("sn(x=torch.randn(1, 4, 1).expand(2, 4, 3))", "OK", ""),
    "sn_x_overlap": ("sn(x=torch.randn(20).as_strided((2, 4, 3), (1, 1, 1)))", "OK", ""),
    "sn_x_channels_last": ("sn(x=torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last))", "OK", ""),
    "sn_x_f16": ("sn(x=X().half())", "OK", ""),
    "sn_x_bf16": ("sn(x=X().bfloat16())", "OK", ""),
    "sn_x_f64": ("sn(x=X().double())", VE, "mixed dtype"),
    "sn_x_nan": ("sn(x=torch.full((2, 4, 3), float('nan')))", "OK", ""),
    "sn_backward_expanded_dy": ("(lambda x: bwd(sn(x=x), x))(X().requires_grad_())", "OK", ""),
    "sn_backward_cl": ("(lambda x: bwd(sn(x=x), x))(torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)"
                       ".requires_grad_())", "OK", ""),
    "bn_rm_short": ("F.batch_norm(X(), torch.zeros(2), torch.ones(4), training=True)", VE,
                    "running_mean " + _VEC.format(2)),
    "bn_rv_long_eval": ("F.batch_norm(X(), torch.zeros(4), torch.ones(40))", VE, "running_var " + _VEC.format(40)),
    "bn_w_short": ("F.batch_norm(X(), None, None, torch.ones(3), training=True)", VE, "weight " + _VEC.format(3)),
    "bn_n1_l1": ("F.batch_norm(torch.randn(1, 4), torch.zeros(4), torch.ones(4), training=True)", "OK", ""),
    "gn_nondiv": ("F.group_norm(X(), 3)", VE, "num_groups must divide the number of channels 4, got 3"),
    "gn_zero": ("F.group_norm(X(), 0)", VE, "num_groups must divide"),
    "gn_bool": ("F.group_norm(X(), True)", VE, "num_groups must divide"),
    "gn_w_short": ("F.group_norm(X(), 2, torch.ones(2))", VE, "weight " + _VEC.format(2)),
    "gn_c0": ("F.group_norm(torch.randn(2, 0, 3), 1)", "OK", ""),
    "in_rm_short": ("F.instance_norm(X(), torch.zeros(3), torch.ones(4))", VE, "running_mean " + _VEC.format(3)),
    "in_eval_rv_short": ("F.instance_norm(X(), torch.zeros(4), torch.ones(3), use_input_stats=False)", VE,
                         "running_var " + _VEC.format(3)),
    "in_eval_rv_none": ("F.instance_norm(X(), torch.zeros(4), None, use_input_stats=False)", VE,
                        "running_var is required"),
    "ln_bad_shape": ("F.layer_norm(X(), (4,))", VE, r"trailing dims are \(4,\)"),
    "ln_w_bad": ("F.layer_norm(X(), (3,), torch.ones(4))", VE, r"weight must have the normalized shape \(3,\)"),
    "ln_w_list": ("F.layer_norm(X(), (3,), [1.0, 1.0, 1.0])", VE, "weight must have the normalized shape"),
    "ln_b_bad": ("F.layer_norm(X(), (3,), None, torch.ones(3, 1))", VE, "bias must have the normalized shape"),
    "ln_w_meta": ("F.layer_norm(X(), (3,), M(3))", RE_, "meta"),
    "ln_zero": ("F.layer_norm(torch.randn(2, 0), (0,))", RE_, "0 elements"),
    "ln_rows0": ("F.layer_norm(torch.randn(0, 3), (3,))", "OK", ""),
    "ln_f16": ("F.layer_norm(X().half(), (3,))", "OK", ""),
}

_SN, _BN, _GN, _LN, _IN = ("normkit.SwitchNorm2d", "normkit.BatchNorm2d", "normkit.GroupNorm", "normkit.LayerNorm",
                           "normkit.InstanceNorm2d")
MODULES = {
    "sn_w_short": (f"mod({_SN}, 4, weight=torch.ones(3))", VE, "weight " + _VEC.format(3)),
    "sn_w_2d": (f"mod({_SN}, 4, weight=torch.ones(4, 1))", VE, r"weight should contain 4 elements"),
    "sn_w_meta": (f"mod({_SN}, 4, weight=M(4))", VE, "weight is on meta"),
    "sn_w_none": (f"mod({_SN}, 4, weight=None)", "OK", ""),
    "sn_w_f64": (f"mod({_SN}, 4, weight=torch.ones(4, dtype=D))", VE, "mixed dtype"),
    "sn_w_f16": (f"mod({_SN}, 4, weight=torch.ones(4, dtype=torch.float16))", VE, "mixed dtype"),
    "sn_w_noncontig": (f"mod({_SN}, 4, weight=torch.ones(8)[::2])", "OK", ""),
    "sn_w_expanded": (f"mod({_SN}, 4, weight=torch.ones(1).expand(4))", "OK", ""),
    "sn_b_long": (f"mod({_SN}, 4, bias=torch.ones(40))", VE, "bias " + _VEC.format(40)),
    "sn_rm_short": (f"mod({_SN}, 4, running_mean=torch.zeros(2))", VE, "running_mean " + _VEC.format(2)),
    "sn_rv_short_eval": (f"mod({_SN}, 4, running_var=torch.ones(2), train=False)", VE,
                         "running_var " + _VEC.format(2)),
    "sn_rm_long_eval": (f"mod({_SN}, 4, running_mean=torch.zeros(400), train=False)", VE,
                        "running_mean " + _VEC.format(400)),
    "sn_rv_none_eval": (f"mod({_SN}, 4, running_var=None, train=False)", VE,
                        "running_mean and running_var are required"),
    "sn_rm_int": (f"mod({_SN}, 4, running_mean=torch.zeros(4, dtype=torch.int64))", VE,
                  "running_mean must be a floating-point"),
    "sn_rm_f64": (f"mod({_SN}, 4, running_mean=torch.zeros(4, dtype=D))", VE, "mixed dtype"),
    "sn_rm_is_rv": (f"(lambda r: mod({_SN}, 4, running_mean=r, running_var=r))(torch.ones(4))", "OK", ""),
    "sn_ml_short": (f"mod({_SN}, 4, mean_logits=torch.zeros(2))", VE, r"mean_logits must have shape \(3,\)"),
    "sn_vl_long": (f"mod({_SN}, 4, var_logits=torch.zeros(5))", VE, r"var_logits must have shape \(3,\)"),
    "sn_ml_none": (f"mod({_SN}, 4, mean_logits=None)", VE, "mean_logits must have shape"),
    "sn_ml_meta": (f"mod({_SN}, 4, mean_logits=M(3))", VE, "mean_logits is on meta"),
    "sn_ml_f16": (f"mod({_SN}, 4, mean_logits=torch.zeros(3, dtype=torch.float16))", "OK", ""),
    "sn_sources_fewer": (f"mod({_SN}, 4, sources=('in', 'ln'))", VE, r"mean_logits must have shape \(2,\)"),
    "sn_sources_list": (f"mod({_SN}, 4, sources=['in', 'ln', 'bn'])", "OK", ""),  # re-parsed on reassignment
    "sn_nf_changed": (f"mod({_SN}, 4, num_features=5, x=torch.randn(2, 5, 3, 5))", VE, "weight should contain 5"),
    "sn_x_wrong_c": (f"mod({_SN}, 4, x=torch.randn(2, 5, 3, 5))", VE, "expects 4 channels on axis 1, got 5"),
    "sn_axis_bad": (f"mod({_SN}, 4, axis=7)", VE, "axis 7 is out of range"),
    "sn_axis_0": (f"mod({_SN}, 4, axis=0, x=torch.randn(4, 4, 3, 5))", VE, "axis must not be the batch axis 0"),
    "sn_axis_str": (f"mod({_SN}, 4, axis='1')", TE, ""),
    "sn_eps_none": (f"mod({_SN}, 4, eps=None)", VE, "eps must be positive \\(> 0 and finite\\), got None"),
    "sn_x_int": (f"mod({_SN}, 4, x=torch.ones(2, 4, 3, 5, dtype=torch.int64))", VE, "expects a floating-point input"),
    "sn_x_3d": (f"mod({_SN}, 4, x=torch.randn(2, 4, 3))", VE, "expects a 4-D input"),
    "sn_channels_last": (f"mod({_SN}, 4, x=torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last))", "OK", ""),
    "sn_axis_last": (f"mod({_SN}, 5, kw=dict(axis=-1))", "OK", ""),
    "bn_rm_short": (f"mod({_BN}, 4, running_mean=torch.zeros(1))", VE, "running_mean " + _VEC.format(1)),
    "bn_rv_short_eval": (f"mod({_BN}, 4, running_var=torch.ones(3), train=False)", VE,
                         "running_var " + _VEC.format(3)),
    "bn_w_short": (f"mod({_BN}, 4, weight=torch.ones(3))", VE, "weight " + _VEC.format(3)),
    "bn_frozen_rm_short": (f"mod({_BN}, 4, running_mean=torch.zeros(3), kw=dict(frozen=True))", VE,
                           "running_mean " + _VEC.format(3)),
    "bn_one_value": ("mod(normkit.BatchNorm1d, 4, x=torch.randn(1, 4))", VE, "Expected more than 1 value per channel"),
    "bn_n0": ("mod(normkit.BatchNorm1d, 4, x=torch.randn(0, 4, 3))", "OK", ""),
    "bn_l0": ("mod(normkit.BatchNorm1d, 4, x=torch.randn(2, 4, 0))", "OK", ""),
    "bn3d_rank": ("mod(normkit.BatchNorm3d, 4)", VE, "expects a 5-D input"),
    "gn_w_short": (f"mod({_GN}, 2, 4, weight=torch.ones(3))", VE, "weight " + _VEC.format(3)),
    "gn_groups_changed": (f"mod({_GN}, 2, 4, num_groups=3)", VE, "num_groups must divide the number of channels 4"),
    "gn_groups_zero": (f"mod({_GN}, 2, 4, num_groups=0)", VE, "num_groups must divide"),
    "gn_nc_changed": (f"mod({_GN}, 2, 4, num_channels=6, x=torch.randn(2, 6, 3, 5))", VE, "weight should contain 6"),
    "gn_eps_neg": (f"mod({_GN}, 2, 4, eps=-1.0)", VE, "eps must be positive"),
    "ln_w_short": (f"mod({_LN}, 5, weight=torch.ones(3))", VE, r"weight must have the normalized shape \(5,\)"),
    "ln_shape_changed": (f"mod({_LN}, 5, normalized_shape=(3,))", VE, r"trailing dims are \(3,\)"),
    "ln_eps_neg": (f"mod({_LN}, 5, eps=-1.0)", VE, "eps must be positive"),
    "in_rm_short": (f"mod({_IN}, 4, running_mean=torch.zeros(3), kw=dict(track_running_stats=True))", VE,
                    "running_mean " + _VEC.format(3)),
    "in_rv_short_eval": (f"mod({_IN}, 4, running_var=torch.ones(3), train=False, kw=dict(track_running_stats=True))",
                         VE, "running_var " + _VEC.format(3)),
    "in_w_long": (f"mod({_IN}, 4, weight=torch.ones(9), kw=dict(affine=True))", VE, "weight " + _VEC.format(9)),
    "in_rm_is_rv": (f"(lambda m: (setattr(m, 'running_var', m.running_mean), m(torch.randn(2, 4, 3, 5))))"
                    f"({_IN}(4, track_running_stats=True))", "OK", ""),
}


@pytest.fixture(scope="module")
def raw_results():
    return _run_child({k: v[0] for k, v in RAW.items()})


@pytest.fixture(scope="module")
def functional_results():
    return _run_child({k: v[0] for k, v in FUNCTIONAL.items()}, BACKENDS)


@pytest.fixture(scope="module")
def module_results():
    return _run_child({k: v[0] for k, v in MODULES.items()}, BACKENDS)


def _check(results, key, expected, pattern):
    kind, message = results[key]
    assert expected in kind.split(), f"{key}: expected {expected}, got {kind}: {message}"
    if pattern:
        assert re.search(pattern, message), f"{key}: message {message!r} does not match {pattern!r}"


@pytest.mark.parametrize("name", list(RAW))
def test_raw_operators(raw_results, name):
    _, expected, pattern = RAW[name]
    _check(raw_results, name, expected, pattern)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_every_backend(functional_results, name, backend):
    _, expected, pattern = FUNCTIONAL[name]
    _check(functional_results, f"{name}[{backend}]", expected, pattern)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_every_backend(module_results, name, backend):
    _, expected, pattern = MODULES[name]
    _check(module_results, f"{name}[{backend}]", expected, pattern)


def test_large_threaded_layouts_match_reference():
    """Big enough for OpenMP (and NLC chunking), several thread counts: auto == reference,
    forward, backward and running statistics (an out-of-bounds read would show here)."""
    code = r'''
import torch, normkit
from normkit import functional as F
def run(b, x, nt):
    torch.set_num_threads(nt)
    c = x.shape[1]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(c, generator=g).requires_grad_(); ml = torch.randn(3, generator=g).requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    xx = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    with normkit.use_backend(b):
        y = F.switch_norm(xx, rm, rv, w, None, ml, ml.detach().flip(0), training=True, momentum=0.3)
        y.backward(torch.randn(y.shape, generator=g))
    return [y.detach(), xx.grad, w.grad, ml.grad, rm, rv]
worst = 0.0
for nt in (1, 3, 16):
    for shape, cl in (((3, 64, 20, 30), False), ((3, 64, 20, 30), True), ((1, 3, 200, 100), True),
                      ((1, 40000, 1, 1), True), ((2, 7, 60, 50), False), ((1, 5, 1, 9000), True)):
        x = torch.randn(*shape)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        for p, q in zip(run("reference", x, nt), run("auto", x, nt)):
            worst = max(worst, ((p - q).abs().max() / (1 + p.abs().max())).item())
print(worst)
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-3
