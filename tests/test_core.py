"""The core layers against float64 references: one table of cases through every check."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import normkit
import reference as ref
from common_layers import CASES, Case, cases, variant


def _randomise(m: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and importance weights, so every input of the mix matters."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "logits" in name else 1.0) + (1.0 if name == "weight" else 0.0))
    return m


def _expected(case: Case, m: nn.Module, x: torch.Tensor, running=None) -> torch.Tensor:
    wm = m.mean_weights.tolist() if hasattr(m, "mean_weights") else None
    wv = m.var_weights.tolist() if hasattr(m, "var_weights") else None
    return ref.switch_norm(
        x, case.sources, wm, wv, m.weight, m.bias, m.eps, case.axis, running=running
    )


def _input(case: Case, dtype=torch.float64, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(case.shape, dtype=torch.float64) * 2 + offset).to(dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(case, backend):
    m = _randomise(case.make().double())
    x = _input(case)
    torch.testing.assert_close(m(x), _expected(case, m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_float32_with_offset(case, backend):
    m = _randomise(case.make())
    x = _input(case, torch.float32, offset=1e4)
    y = m(x)
    assert y.dtype == torch.float32
    # The input itself is quantised to ~1e-3 at 1e4; the reference sees the same values.
    torch.testing.assert_close(y.double(), _expected(case, m, x), rtol=0, atol=5e-3)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck(case, backend):
    m = _randomise(case.make().double())
    x = _input(case).requires_grad_()
    names = [n for n, _ in m.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in m.parameters()]
    # functional_call makes the parameters (x, gamma, beta, both logit vectors) the inputs.
    fn = lambda x, *ps: torch.func.functional_call(m, dict(zip(names, ps)), (x,))
    assert torch.autograd.gradcheck(fn, (x, *leaves), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", cases(running=True), ids=str)
def test_running_stats_and_eval(case, backend):
    m = case.make(tracking=True).double()
    batches = [_input(case, offset=float(i)) for i in range(3)]
    for b in batches:
        m(b)
    if case.sources == ("in",):  # torch.nn.InstanceNorm's definition: mean of per-sample estimates
        t = nn.InstanceNorm1d(m.num_features, momentum=m.momentum, track_running_stats=True).double()
        for b in batches:
            t(b.reshape(b.shape[0], b.shape[1], -1))
        rm, rv = t.running_mean, t.running_var
    else:
        rm, rv = ref.running_after(batches, m.momentum, case.axis)
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)
    # torch's instance norm never counts batches; its batch norm does
    assert int(m.num_batches_tracked) == (0 if case.sources == ("in",) else 3)
    m.eval()
    x = _input(case)
    if case.sources == ("in",):  # eval: the running statistics replace the IN ones
        expected = ref.switch_norm(x, ("bn",), weight=m.weight, bias=m.bias, eps=m.eps, axis=case.axis, running=(rm, rv))
    else:
        expected = _expected(case, m, x, running=(rm, rv))
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    before = m.running_mean.clone()
    m(x)
    assert torch.equal(m.running_mean, before), "eval must not update running statistics"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_dict_pickle_deepcopy(case):
    m = _randomise(case.make())
    x = _input(case, torch.float32)
    m(x)
    m.eval()
    expected = m(x)
    clone = case.make()
    clone.load_state_dict(m.state_dict(), strict=True)
    clone.eval()
    torch.testing.assert_close(clone(x), expected)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(clone(x), expected)
    torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), expected)
    torch.testing.assert_close(copy.deepcopy(m)(x), expected)
    assert m.state_dict()._metadata[""]["version"] == type(m)._version


# --- equivalences -------------------------------------------------------------------------

_ONE_HOT = {"in": 0, "ln": 1, "bn": 2}


@pytest.mark.parametrize("source", ["in", "ln", "bn"])
def test_one_hot_sn_equals_plain_layers(source, backend):
    sn = normkit.SwitchNorm2d(6).double()
    with torch.no_grad():
        sn.mean_logits.copy_(torch.full((3,), -1e4)).index_fill_(0, torch.tensor(_ONE_HOT[source]), 0.0)
        sn.var_logits.copy_(sn.mean_logits)
        sn.weight.normal_()
        sn.bias.normal_()
    plain = {
        "in": nn.InstanceNorm2d(6, affine=True),
        "ln": nn.GroupNorm(1, 6),
        "bn": nn.BatchNorm2d(6),
    }[source].double()
    mine = {
        "in": normkit.InstanceNorm2d(6, affine=True),
        "ln": normkit.GroupNorm(1, 6),
        "bn": normkit.BatchNorm2d(6),
    }[source].double()
    for layer in (plain, mine):
        layer.load_state_dict({k: v for k, v in sn.state_dict().items() if k in layer.state_dict()}, strict=False)
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    y = sn(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    for layer in (plain, mine):
        yl = layer(x)
        torch.testing.assert_close(y, yl, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx, torch.autograd.grad(yl, x, g)[0], rtol=1e-9, atol=1e-9)
    if source == "bn":
        torch.testing.assert_close(sn.running_mean, plain.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sn.running_var, plain.running_var, rtol=1e-12, atol=1e-12)


def test_group_norm_extremes(backend):
    x = torch.randn(3, 8, 5, dtype=torch.float64)
    gn_c = normkit.GroupNorm(8, 8, affine=False).double()
    gn_1 = normkit.GroupNorm(1, 8, affine=False).double()
    torch.testing.assert_close(gn_c(x), normkit.InstanceNorm1d(8)(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gn_c(x), nn.InstanceNorm1d(8).double()(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gn_1(x), nn.functional.layer_norm(x, x.shape[1:]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_groups,shape", [(2, (3, 6, 4)), (3, (2, 6, 3, 3)), (1, (2, 4, 2, 2, 2)), (6, (2, 6))])
def test_group_norm_matches_torch(num_groups, shape, backend):
    c = shape[1]
    mine = _randomise(normkit.GroupNorm(num_groups, c).double())
    theirs = nn.GroupNorm(num_groups, c).double()
    theirs.load_state_dict(mine.state_dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    _same_forward_backward(mine, theirs, x)


@pytest.mark.parametrize("shape", [(4, 8), (2, 3, 8), (2, 3, 4, 5)])
@pytest.mark.parametrize("elementwise_affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch(shape, elementwise_affine, bias, backend):
    norm_shape = shape[-2:] if len(shape) == 4 else shape[-1:]
    mine = normkit.LayerNorm(norm_shape, elementwise_affine=elementwise_affine, bias=bias).double()
    theirs = nn.LayerNorm(norm_shape, elementwise_affine=elementwise_affine, bias=bias).double()
    if elementwise_affine:
        _randomise(mine)
        theirs.load_state_dict(mine.state_dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    _same_forward_backward(mine, theirs, x)


def _same_forward_backward(mine: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    y1, y2 = mine(x), theirs(x)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y1)
    p1, p2 = list(mine.parameters()), list(theirs.parameters())
    g1 = torch.autograd.grad(y1, [x, *p1], g)
    g2 = torch.autograd.grad(y2, [x, *p2], g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_BN_SHAPES = {1: [(6, 3), (4, 3, 5)], 2: [(3, 3, 4, 2)], 3: [(2, 3, 2, 3, 2)]}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
def test_batch_norm_matches_torch_for_all_flags(dim, affine, track, momentum, backend):
    mine = variant("bn").build(3, dim, momentum=momentum, affine=affine, track_running_stats=track).double()
    theirs = _TORCH_BN[dim](3, momentum=momentum, affine=affine, track_running_stats=track).double()
    if affine:
        _randomise(mine)
    theirs.load_state_dict(mine.state_dict(), strict=True)
    for shape in _BN_SHAPES[dim]:
        for mode in ("train", "train", "eval", "train"):
            mine.train(mode == "train")
            theirs.train(mode == "train")
            x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
            _same_forward_backward(mine, theirs, x)
            for k, v in theirs.state_dict().items():
                torch.testing.assert_close(mine.state_dict()[k], v, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_instance_norm_matches_torch_with_running_stats(dim, backend):
    mine = variant("in-affine").build(3, dim, tracking=True).double()
    theirs = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim](
        3, affine=True, track_running_stats=True
    ).double()
    _randomise(mine)
    theirs.load_state_dict(mine.state_dict(), strict=True)
    shape = (2, 3) + (4,) * dim
    for mode in ("train", "train", "eval"):
        mine.train(mode == "train")
        theirs.train(mode == "train")
        x = (torch.randn(shape, dtype=torch.float64) + 2).requires_grad_()
        _same_forward_backward(mine, theirs, x)
    torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)


def test_torch_checkpoint_loads_strict():
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    theirs(torch.randn(2, 3, 6, 6))
    mine = nn.Sequential(nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4), nn.ReLU())
    mine.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval()
    mine.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(mine(x), theirs(x))
    # and back: normkit BN checkpoints load into torch
    theirs.load_state_dict(mine.state_dict(), strict=True)


def test_old_checkpoint_without_num_batches_tracked():
    m = normkit.BatchNorm2d(3)
    sd = m.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    m.load_state_dict(sd, strict=True)
    assert int(m.num_batches_tracked) == 0


# --- options ------------------------------------------------------------------------------


def test_center_and_scale_flags():
    assert normkit.BatchNorm2d(3, center=False).bias is None
    assert normkit.BatchNorm2d(3, scale=False).weight is None
    m = normkit.SwitchNorm2d(3, scale=False)
    assert m.weight is None and m.bias is not None
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    m = normkit.BatchNorm2d(3, scale=False).double()
    with torch.no_grad():
        m.bias.fill_(2.0)
    torch.testing.assert_close(m(x), ref.switch_norm(x, ("bn",), bias=m.bias), rtol=1e-10, atol=1e-10)
    assert "affine=True, bias=True, scale=False" in repr(m)


def test_frozen_survives_train_mode(backend):
    m = normkit.BatchNorm2d(3).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        m.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    m.frozen = True
    m.train()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = m(x)
    expected = ref.switch_norm(x, ("bn",), weight=m.weight, bias=m.bias, running=(m.running_mean, m.running_var))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    y.sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    torch.testing.assert_close(m.running_mean, torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    assert int(m.num_batches_tracked) == 0
    assert "frozen=True" in repr(m)
    # a frozen SN keeps its BN source fixed while IN/LN still come from the sample
    sn = normkit.SwitchNorm2d(3, frozen=True).double()
    sn(x)
    torch.testing.assert_close(sn.running_var, torch.ones(3, dtype=torch.float64))


def test_momentum_none_is_cumulative_average(backend):
    m = normkit.SwitchNorm1d(3, momentum=None).double()
    batches = [torch.randn(5, 3, 4, dtype=torch.float64) + i for i in range(4)]
    for b in batches:
        m(b)
    rm, rv = ref.running_after(batches, None)
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)


def test_reset_running_stats_and_parameters():
    m = _randomise(normkit.SwitchNorm2d(3, last_gamma=True))
    m(torch.randn(4, 3, 2, 2))
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(3)) and int(m.num_batches_tracked) == 0
    m.reset_parameters()
    assert torch.equal(m.weight, torch.zeros(3)), "last_gamma initialises gamma to 0"
    assert torch.equal(m.mean_logits, torch.zeros(3))
    torch.testing.assert_close(m.mean_weights, torch.full((3,), 1 / 3))


def test_sn_attributes_and_repr():
    m = normkit.SwitchNorm2d(8, sources=("bn", "in", "gn4"))
    assert m.sources == ("bn", "in", "gn4")
    assert m.mean_logits.shape == (3,) and m.var_logits.shape == (3,)
    assert m.weight.shape == (8,) and m.running_mean.shape == (8,)
    assert "sources=('bn', 'in', 'gn4')" in repr(m)
    assert normkit.SwitchNorm2d(8, sources=("in", "ln")).running_mean is None
    assert set(normkit.SwitchNorm2d(4).state_dict()) == {
        "weight", "bias", "mean_logits", "var_logits", "running_mean", "running_var", "num_batches_tracked"
    }


def test_device_and_dtype_kwargs():
    m = normkit.SwitchNorm2d(3, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m.running_var.dtype == torch.float64 and m.num_batches_tracked.dtype == torch.long
    g = normkit.GroupNorm(1, 3, dtype=torch.float16)
    assert g.weight.dtype == torch.float16


# --- degenerate shapes --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (3, 4, 1, 1), (1, 4, 3, 3), (1, 4)])
def test_sn_degenerate_shapes_have_no_nan(shape, backend):
    cls = normkit.SwitchNorm2d if len(shape) == 4 else normkit.SwitchNorm1d
    m = _randomise(cls(4)).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        m.train(training)
        y = m(x)
        y.square().sum().backward()
        assert torch.isfinite(y).all()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        assert torch.isfinite(m.running_var).all()
    if shape[0] * (x.numel() // (shape[0] * shape[1])) == 1:
        assert torch.equal(m.running_var, torch.ones(4, dtype=torch.float64)), "no variance estimate: unchanged"


def test_sn_with_one_position_gives_in_source_beta():
    m = normkit.SwitchNorm2d(3, sources=("in",))
    with torch.no_grad():
        m.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    y = m(torch.randn(2, 3, 1, 1))
    torch.testing.assert_close(y, m.bias.reshape(1, 3, 1, 1).expand(2, 3, 1, 1).detach())


# --- errors -------------------------------------------------------------------------------


def test_errors_name_expected_and_received():
    with pytest.raises(ValueError, match=r"SwitchNorm2d expects a 4-D input \(N, C, H, W\), got a 3-D input"):
        normkit.SwitchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"BatchNorm1d expects a 2-D or 3-D input"):
        normkit.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expects 3 channels on axis 1, got 5"):
        normkit.SwitchNorm2d(3)(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"expects 3 channels on axis -1, got 4"):
        normkit.BatchNorm2d(3, axis=-1)(torch.randn(2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"floating-point input, got dtype torch.int64; convert it with x.float\(\)"):
        normkit.BatchNorm2d(3)(torch.ones(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"floating-point input, got dtype torch.int64"):
        normkit.LayerNorm(4)(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"eps must be positive \(> 0 and finite\), got 0"):
        normkit.SwitchNorm2d(3, eps=0)
    with pytest.raises(ValueError, match=r"eps must be positive \(> 0 and finite\), got -1"):
        normkit.GroupNorm(1, 3, eps=-1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] .*got 1.5"):
        normkit.BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] .*got -0.1"):
        normkit.SwitchNorm1d(3, momentum=-0.1)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size \[1, 3\]"):
        normkit.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\[1, 3, 1, 1\]"):
        normkit.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"unknown normalizer source 'xn'; valid sources are 'in', 'ln', 'bn'"):
        normkit.SwitchNorm2d(3, sources=("in", "xn"))
    with pytest.raises(ValueError, match=r"source 'gn4' needs a group count that divides num_features=6"):
        normkit.SwitchNorm2d(6, sources=("gn4",))
    with pytest.raises(ValueError, match=r"at least one of"):
        normkit.SwitchNorm2d(6, sources=())
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups \(4\)"):
        normkit.GroupNorm(4, 6)
    with pytest.raises(ValueError, match=r"num_features must be a positive int, got 0"):
        normkit.BatchNorm2d(0)
    with pytest.raises(ValueError, match=r"axis 4 is out of range for a 4-D input"):
        normkit.BatchNorm2d(3, axis=4)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"mean_logits must have shape \(3,\)"):
        normkit.functional.switch_norm(torch.randn(2, 3, 4), None, None, None, None, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        normkit.set_backend("cuda")


def test_batch_norm_eval_with_single_value_is_fine():
    m = normkit.BatchNorm1d(3).eval()
    assert torch.isfinite(m(torch.randn(1, 3))).all()


# --- functional ops and docstring examples ------------------------------------------------


def test_functional_ops_match_torch(backend):
    tf = torch.nn.functional
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64) * 2 + 1
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    rm1, rv1 = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    rm2, rv2 = rm1.clone(), rv1.clone()
    F = normkit.functional
    torch.testing.assert_close(
        F.batch_norm(x, rm1, rv1, w, b, training=True, momentum=0.3),
        tf.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.3),
    )
    torch.testing.assert_close(rv1, rv2)
    torch.testing.assert_close(F.batch_norm(x, rm1, rv1, w, b), tf.batch_norm(x, rm2, rv2, w, b))
    torch.testing.assert_close(F.group_norm(x, 3, w, b), tf.group_norm(x, 3, w, b))
    torch.testing.assert_close(F.layer_norm(x, (3, 5)), tf.layer_norm(x, (3, 5)))
    torch.testing.assert_close(F.instance_norm(x, weight=w, bias=b), tf.instance_norm(x, weight=w, bias=b))
    m = F.moments(x + 1e4)
    torch.testing.assert_close(m.var, (x + 1e4).var((2, 3), correction=0))
    assert m.count.shape == (4, 1) and float(m.count[0]) == 15.0


def test_docstring_examples_run():
    import doctest

    import normkit.nn.batchnorm
    import normkit.nn.norms
    import normkit.nn.switchnorm

    for module in (normkit.nn.switchnorm, normkit.nn.batchnorm, normkit.nn.norms):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
