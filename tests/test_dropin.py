"""normkit's layers as true drop-ins for torch.nn: types that torch's own tools recognise,
torch 2.13's signatures and semantics, validation of every argument, and model conversions
(``convert``, ``fuse``) that report everything and change no behaviour they do not report."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from common_layers import TORCH_NAMESAKES
from models import BatchNormAct2d, ConvNeXtStack, EfficientNetStyle, LayerNorm2d, ResNet50
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

import normkit
import normkit.tools.convert as convert_module

NORMKIT_BN = (normkit.BatchNorm1d, normkit.BatchNorm2d, normkit.BatchNorm3d)


# ---------------------------------------------------------------------------------------- types


def test_every_namesake_is_an_instance_of_its_torch_class_and_of_normmodule():
    for torch_cls, cls in TORCH_NAMESAKES.items():
        assert issubclass(cls, torch_cls) and issubclass(cls, normkit.NormModule)
    assert all(issubclass(c, _BatchNorm) for c in NORMKIT_BN)
    assert issubclass(normkit.InstanceNorm2d, _NormBase)
    for sn in (normkit.SwitchNorm1d, normkit.SwitchNorm2d, normkit.SwitchNorm3d):
        assert issubclass(sn, normkit.NormModule) and not issubclass(sn, _NormBase)


def test_signatures_match_torch_parameter_for_parameter():
    for torch_cls, cls in TORCH_NAMESAKES.items():
        theirs = inspect.signature(torch_cls.__init__).parameters
        ours = inspect.signature(cls.__init__).parameters
        positional = [n for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD][: len(positional)] == positional
        for name, p in theirs.items():
            if name == "self" or p.kind is p.VAR_KEYWORD:
                continue
            assert name in ours, f"{cls.__name__} lacks {name}"
            assert ours[name].default == p.default, f"{cls.__name__}.{name}"
        extras = [n for n, p in ours.items() if n not in theirs and p.kind is not p.VAR_KEYWORD]
        assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extras), extras
    m = normkit.BatchNorm2d(8, 1e-5, 0.1, True, True, "cpu", torch.float64)
    assert m.weight.dtype == torch.float64
    for made in (normkit.BatchNorm2d(8, bias=False), normkit.GroupNorm(4, 8, bias=False),
                 normkit.InstanceNorm2d(8, affine=True, bias=False), normkit.LayerNorm(8, bias=False)):
        assert made.bias is None and made.weight is not None and "bias=False" in repr(made)


def test_convert_sync_batchnorm_takes_normkit_bn_and_leaves_switchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), normkit.BatchNorm2d(4), normkit.SwitchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced[1]) is nn.SyncBatchNorm and torch.equal(synced[1].running_mean, model[1].running_mean)
    assert type(synced[2]) is normkit.SwitchNorm2d  # not mistaken for a batch norm


def test_torch_fusion_swa_update_bn_and_ao_fusion():
    conv, bn = nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    conv.eval(), bn.eval()
    x = torch.randn(2, 3, 6, 6)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)

    # swa_utils.update_bn: cumulative averages (momentum=None) over a loader, as for torch's BN
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4, momentum=0.3))
    theirs = copy.deepcopy(ours)
    theirs[1] = nn.BatchNorm2d(4, momentum=0.3)
    theirs[1].load_state_dict(ours[1].state_dict())
    loader = [torch.randn(4, 3, 6, 6) + i for i in range(3)]
    torch.optim.swa_utils.update_bn(loader, ours)
    torch.optim.swa_utils.update_bn(loader, theirs)
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean)
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var)
    assert ours[1].momentum == 0.3

    # torch.ao's fuser looks fusions up by exact type: normkit layers go through "torch" first
    model = nn.Sequential(nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4)).eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["0", "1"]])
    plain = normkit.convert(copy.deepcopy(model), "torch")
    assert type(plain[1]) is nn.BatchNorm2d
    fused = torch.ao.quantization.fuse_modules(plain, [["0", "1"]])
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_jit_script_refuses_what_torch_cannot_express():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError, match="SwitchNorm2d has no torch.nn equivalent.*use torch.compile"):
            torch.jit.script(normkit.SwitchNorm2d(3))
        with pytest.raises(TypeError, match=r"BatchNorm2d with axis=-1 has no torch.nn equivalent"):
            torch.jit.script(normkit.BatchNorm2d(3, axis=-1))
        with pytest.raises(TypeError, match=r"frozen=True"):
            torch.jit.script(normkit.BatchNorm2d(3, frozen=True))


# ------------------------------------------------------------------------- instance norm rules


def test_instance_norm_running_stats_follow_torch():
    x = torch.randn(4, 3, 6)
    for momentum in (0.3, None):
        ours = normkit.InstanceNorm1d(3, momentum=momentum, track_running_stats=True)
        theirs = nn.InstanceNorm1d(3, momentum=momentum, track_running_stats=True)
        for _ in range(3):
            ours(x + 1)
            theirs(x + 1)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 0
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_instance_norm_unbatched_and_channel_mismatch():
    x = torch.randn(3, 15)
    torch.testing.assert_close(normkit.InstanceNorm1d(3)(x), nn.InstanceNorm1d(3)(x))
    with pytest.warns(UserWarning, match="does not match num_features"):
        y = normkit.InstanceNorm1d(4)(torch.randn(2, 3, 5))
    assert y.shape == (2, 3, 5)
    with pytest.raises(ValueError, match=r"expected input's size at dim=1 to match num_features \(4\), but got: 3"):
        normkit.InstanceNorm1d(4, affine=True)(torch.randn(2, 3, 5))


# --------------------------------------------------------------------------------- validation


def test_eps_and_momentum_are_checked_when_assigned():
    m = normkit.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"eps must be positive \(> 0 and finite\), got -1"):
        m.eps = -1
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\].*got 2"):
        m.momentum = 2
    m.momentum = None  # a cumulative average is allowed
    with pytest.raises(ValueError, match="eps must be positive"):
        normkit.GroupNorm(2, 4).eps = 0.0


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_inputs_raise_torch_error_types(dtype):
    x = torch.ones(2, 4, 3).to(dtype)
    with pytest.raises(NotImplementedError, match="must be float16, bfloat16, float32 or float64"):
        normkit.functional.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="expects a floating-point input"):
        normkit.BatchNorm1d(4)(x)


def test_mixed_dtypes_raise_like_torch():
    with pytest.raises(RuntimeError, match="mixed dtype: weight is torch.float64 but the input is torch.float32"):
        normkit.BatchNorm2d(3).double()(torch.randn(2, 3, 4, 4))
    y = normkit.BatchNorm2d(3)(torch.randn(2, 3, 4, 4).bfloat16())  # float32 layer, reduced input: fine
    assert y.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        normkit.functional.batch_norm(torch.randn(2, 4, 5), torch.zeros(3), torch.ones(3), training=True)


def test_bad_running_variances_give_nan_like_torch(backend):
    ours, theirs = normkit.BatchNorm2d(3).eval(), nn.BatchNorm2d(3).eval()
    for m in (ours, theirs):
        m.running_var[0], m.running_var[1] = float("nan"), -1.0
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x), equal_nan=True)
    assert ours(x)[:, :2].isnan().all()


def test_argument_errors_name_argument_expected_and_received():
    with pytest.raises(TypeError, match=r"sources must be strings .*got \(1, 2\)"):
        normkit.SwitchNorm2d(4, sources=(1, 2))
    with pytest.raises(ValueError, match="unknown normalizer source 'gn01'"):
        normkit.SwitchNorm2d(4, sources=("gn01", "gn1"))
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        normkit.create_norm("gn", 0)
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups \(4\)"):
        normkit.GroupNorm(4, 6)


# ------------------------------------------------------------------------------------ convert


def _norm_paths(model: nn.Module) -> set[str]:
    return {p for p, m in model.named_modules()
            if isinstance(m, (_NormBase, nn.GroupNorm, nn.LayerNorm, normkit.NormModule))}


MODELS = {
    "resnet50": (lambda: ResNet50(width=16), (2, 3, 32, 32)),
    "convnext": (ConvNeXtStack, (2, 3, 32, 32)),
    "efficientnet": (EfficientNetStyle, (2, 3, 32, 32)),
}


@pytest.fixture(autouse=True)
def _norm_act_converter(monkeypatch):
    # registered for these tests only (the registry is global)
    monkeypatch.setattr(convert_module, "_CONVERTERS", dict(convert_module._CONVERTERS))
    normkit.register_converter(BatchNormAct2d, normkit.norm_act_converter("act"))


@pytest.mark.parametrize("target", ["batch", "switch", "group", "layer", "instance"])
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_reports_every_norm(name, target):
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(shape)
    norms = _norm_paths(model)
    converted, report = normkit.convert(model, target, example_input=x, report=True)
    assert {e.path for e in report.entries} == norms
    assert not report.refused
    kept = {e.path for e in report.kept}
    for e in report.kept:
        assert e.reason
    assert converted(x).shape == (2, 10)
    if name == "convnext":  # channel LayerNorms both ways; the head's trailing-dims LN kept
        axes = {e.path: e.reason for e in report.converted}
        assert "axis=-1" in axes["stage1.0.norm"] and "axis=1" in axes["stem.1"] and kept == {"head_norm"}


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_to_batch_changes_nothing_and_round_trips_to_torch(name):
    build, shape = MODELS[name]
    model = build()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
    original = copy.deepcopy(model)
    # float64: training-mode BN over 2 values per channel in the last stage amplifies rounding
    x = torch.randn(shape, dtype=torch.float64)
    converted, report = normkit.convert(model.double(), "batch", report=True)
    if name == "resnet50":  # only batch norms: the same function up to rounding
        for mode in ("train", "eval"):
            a, b = getattr(copy.deepcopy(converted), mode)(), getattr(copy.deepcopy(original).double(), mode)()
            torch.testing.assert_close(a(x), b(x), rtol=1e-7, atol=1e-7)
    back = normkit.convert(converted, "torch")
    assert not any(isinstance(m, normkit.NormModule) for m in back.modules())
    if name == "resnet50":
        assert {type(m) for m in back.modules() if isinstance(m, _NormBase)} == {nn.BatchNorm2d}
        back.load_state_dict(original.state_dict(), strict=True)
    assert all(e.action == "converted" for e in report.entries if "LayerNorm" not in e.old)


def test_convert_carries_bias_groups_and_refuses_what_it_cannot_carry():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32, bias=False), nn.GroupNorm(8, 32))
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    converted = normkit.convert(copy.deepcopy(model), "batch")
    assert converted[1].bias is None
    converted[1].load_state_dict(model[1].state_dict(), strict=True)
    grouped = normkit.convert(copy.deepcopy(model), "group")
    assert grouped[2].num_groups == 8
    # a momentum has nothing to move in a layer without running statistics: not a refusal
    assert isinstance(normkit.convert(nn.Sequential(nn.BatchNorm2d(4, momentum=0.3)), "group")[0], nn.GroupNorm)
    torch.testing.assert_close(grouped[2](expected), model[2](expected))
    with pytest.raises(ValueError, match=r"'0' \(SwitchNorm2d\): SwitchNorm2d has no torch.nn equivalent"):
        normkit.convert(nn.Sequential(normkit.SwitchNorm2d(4)), "torch")
    with pytest.raises(ValueError, match=r"GroupNorm cannot carry frozen=True"):
        normkit.convert(nn.Sequential(normkit.BatchNorm2d(4, frozen=True)), nn.GroupNorm)
    lazy = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="uninitialised lazy norm"):
        normkit.convert(lazy, "switch")
    done, report = normkit.convert(lazy, "switch", example_input=x, report=True)
    assert type(done[1]) is normkit.SwitchNorm2d and report.converted[0].path == "1"


def test_convert_carries_hooks_training_flag_and_strict_false_converts_the_rest():
    calls = []
    bn = nn.BatchNorm2d(4)
    bn.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model = nn.Sequential(bn, BatchNormAct2d(4)).eval()
    normkit.register_converter(BatchNormAct2d, lambda m, to, opts: (_ for _ in ()).throw(TypeError("no")))
    with pytest.raises(TypeError):
        normkit.convert(copy.deepcopy(model), "switch")
    normkit.register_converter(BatchNormAct2d, normkit.norm_act_converter("act"))
    converted = normkit.convert(model, "switch")
    assert not converted[0].training
    converted(torch.randn(2, 4, 3, 3))
    assert calls == ["SwitchNorm2d"]
    assert isinstance(converted[1], nn.Sequential) and isinstance(converted[1][1], nn.SiLU)


# --------------------------------------------------------------------------------------- fuse


def test_fuse_folds_every_conv_bn_pair_of_resnet50():
    model = ResNet50().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    bns = [p for p, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53
    fused, report = normkit.fuse(model, report=True)
    assert report.traced and len(report.folded) == 53 and not report.left
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_fuse_reports_why_a_batch_norm_is_left():
    class AfterAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y + 1) + y

    model = AfterAdd().eval()
    _, report = normkit.fuse(model, report=True)
    reasons = dict(report.left)
    assert "not the output of a Conv" in reasons["bn"] and reasons["other"] == "not called in forward"
    assert not report.folded


def test_channel_layernorm2d_detection_checks_behaviour():
    stack = nn.Sequential(nn.Conv2d(3, 8, 1), LayerNorm2d(8))
    _, report = normkit.convert(stack, "batch", example_input=torch.randn(2, 3, 4, 4), report=True)
    assert report.converted[0].reason == "channel LayerNorm, axis=1"
