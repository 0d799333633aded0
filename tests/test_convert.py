"""create_norm and convert, on a ResNet-18-style network built here (no torchvision)."""

import pytest
import torch
from torch import nn

import normkit
from normkit.nn.registry import KINDS, dim_of, kind_named, kind_of


# ---------------------------------------------------------------------------------- create_norm


@pytest.mark.parametrize(
    "name, dim, cls",
    [("bn", 2, normkit.BatchNorm2d), ("Batch", 1, normkit.BatchNorm1d), ("sn", 3, normkit.SwitchNorm3d),
     ("switch", 2, normkit.SwitchNorm2d), ("in", 1, normkit.InstanceNorm1d), ("instance", 3, normkit.InstanceNorm3d)],
)
def test_create_norm_classes(name, dim, cls):
    layer = create = normkit.create_norm(name, 12, dim=dim, eps=1e-3)
    assert type(create) is cls and layer.num_features == 12 and layer.eps == 1e-3


def test_create_norm_group_layer_instance_defaults():
    assert normkit.create_norm("gn", 64).num_groups == 32
    assert normkit.create_norm("gn", 48).num_groups == 24  # 32 does not divide 48
    assert normkit.create_norm("group", 10).num_groups == 10
    assert normkit.create_norm("gn", 64, num_groups=4).num_groups == 4
    ln = normkit.create_norm("LN", 6)
    assert type(ln) is normkit.GroupNorm and ln.num_groups == 1 and ln.num_channels == 6
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    ref = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(x.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln.double()(x), ref)
    assert normkit.create_norm("in", 4).affine is True
    assert normkit.create_norm("sn", 8, sources=("in", "bn")).sources == ("in", "bn")
    assert isinstance(normkit.create_norm("none", 8), nn.Identity)


def test_create_norm_errors():
    with pytest.raises(ValueError, match=r"unknown normalization name 'xx'; valid names are bn/batch, sn/switch"):
        normkit.create_norm("xx", 8)
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3.*got 4"):
        normkit.create_norm("bn", 8, dim=4)


# ------------------------------------------------------------------------------------- convert


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18ish(width=4):
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(11)


def test_convert_resnet_to_switch_carries_everything():
    torch.manual_seed(1)
    model = resnet18ish().double()
    _randomise_bn(model)
    torch_bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = model.eval()(x)
    model.train()
    converted = normkit.convert(model, "switch")
    assert converted is model
    sns = {name: m for name, m in model.named_modules() if isinstance(m, normkit.SwitchNorm2d)}
    assert sns.keys() == torch_bns.keys() and len(sns) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for name, sn in sns.items():
        old = torch_bns[name]
        assert sn.weight.dtype == torch.float64 and sn.training
        assert torch.equal(sn.weight, old.weight) and torch.equal(sn.bias, old.bias)
        assert torch.equal(sn.running_mean, old.running_mean) and torch.equal(sn.running_var, old.running_var)
        assert int(sn.num_batches_tracked) == 11
        with torch.no_grad():  # one-hot on the BN source: must reproduce the torch network exactly
            sn.mean_logits.copy_(torch.tensor([-200.0, -200.0, 200.0]))
            sn.var_logits.copy_(torch.tensor([-200.0, -200.0, 200.0]))
    torch.testing.assert_close(model.eval()(x), expected, rtol=1e-10, atol=1e-10)


def test_convert_to_batch_matches_torch_in_train_and_eval():
    torch.manual_seed(2)
    ref = resnet18ish().double()
    _randomise_bn(ref)
    model = resnet18ish().double()
    model.load_state_dict(ref.state_dict())
    normkit.convert(model, "batch")
    assert sum(isinstance(m, normkit.BatchNorm2d) for m in model.modules()) == 20
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model.train()(x), ref.train()(x))
    torch.testing.assert_close(model.eval()(x), ref.eval()(x))
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)


@pytest.mark.parametrize("target, groups", [("group", 4), ("layer", 1)])
def test_convert_to_group_and_layer(target, groups):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    options = {"num_groups": 4} if target == "group" else {}
    normkit.convert(model, target, **options)
    gn = model[1]
    assert type(gn) is normkit.GroupNorm and gn.num_groups == groups
    ref = nn.GroupNorm(groups, 8)
    ref.load_state_dict(gn.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model(x), ref(model[0](x)))


def test_convert_instance_sync_class_and_factory():
    model = nn.Sequential(nn.BatchNorm3d(4), nn.InstanceNorm1d(4), nn.GroupNorm(2, 4))
    normkit.convert(model, "instance")
    assert type(model[0]) is normkit.InstanceNorm3d and model[0].affine  # affine carried from BN
    assert type(model[1]) is normkit.InstanceNorm1d and not model[1].affine
    assert type(model[2]) is normkit.InstanceNorm2d  # GroupNorm does not say: dim defaults to 2

    group = object()
    model = nn.Sequential(nn.BatchNorm1d(4), normkit.SwitchNorm2d(4), normkit.GroupNorm(2, 4))
    normkit.convert(model, "sync", process_group=group)
    assert type(model[0]) is normkit.BatchNorm1d and model[0].process_group is group
    assert model[1].process_group is group and type(model[2]) is normkit.GroupNorm
    with pytest.raises(ValueError, match="needs a process group"):
        normkit.convert(nn.BatchNorm2d(4), "sync")

    converted = normkit.convert(nn.BatchNorm2d(4, eps=1e-3), normkit.SwitchNorm2d, sources=("in", "bn"))
    assert type(converted) is normkit.SwitchNorm2d and converted.eps == 1e-3 and converted.sources == ("in", "bn")
    made = normkit.convert(nn.Sequential(nn.BatchNorm2d(6)), lambda c: nn.GroupNorm(3, c))
    assert type(made[0]) is nn.GroupNorm and made[0].num_groups == 3


class BatchNormAct2d(nn.BatchNorm2d):  # like timm's: a norm fused with an activation
    def forward(self, x):
        return torch.relu(super().forward(x))


class PlainSubclass(nn.BatchNorm2d):
    pass


def test_subclass_with_own_forward_never_flattened():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(BatchNormAct2d(4)), PlainSubclass(4))
    with pytest.raises(ValueError, match=r"'1\.0' \(BatchNormAct2d\) subclasses BatchNorm2d(.|\n)*strict=False"):
        normkit.convert(model, "switch")
    normkit.convert(model, "switch", strict=False)
    assert type(model[1][0]) is BatchNormAct2d and type(model[2]) is normkit.SwitchNorm2d


def test_shared_module_stays_shared_and_errors():
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    normkit.convert(model, "batch")
    assert model[0] is model[2] and type(model[0]) is normkit.BatchNorm2d
    with pytest.raises(ValueError, match="unknown normalization name 'fancy'"):
        normkit.convert(model, "fancy")
    with pytest.raises(ValueError, match="convert target must be one of"):
        normkit.convert(model, "none")


def test_convert_keeps_batch_statistics_in_eval_without_running_stats():
    old = nn.BatchNorm2d(4, affine=False, track_running_stats=False).eval()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    expected = old(x)
    new = normkit.convert(old, "switch", sources=("bn",))
    assert new.running_mean is None and new.weight is None and not new.training
    torch.testing.assert_close(new(x), expected)


class SubclassOf3d(nn.BatchNorm3d):
    pass


def test_convert_takes_dim_from_a_subclass_base():
    assert type(normkit.convert(SubclassOf3d(4), "switch")) is normkit.SwitchNorm3d


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_every_registry_kind_builds_by_each_of_its_names(kind):
    assert kind_named(kind.name) is kind and kind.name in kind.aliases
    for name in kind.aliases:
        assert kind_named(name.upper()) is kind
    for dim in (1, 2, 3):
        layer = normkit.create_norm(kind.name, 8, dim=dim)
        assert kind_of(layer) is kind
        assert dim_of(layer) in (dim, None)
        if kind.convertible:
            assert kind_of(normkit.convert(nn.BatchNorm2d(8), kind.name, dim=dim)) is kind
