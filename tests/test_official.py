"""load_official_switchnorm on a state dict built here in the official SN layout."""

import pytest
import torch
from torch import nn

import normkit
import reference


def _official_layer(prefix, c, k=3, running=True, flat=False):
    g = torch.Generator().manual_seed(len(prefix) + c)
    shape = (1, c) if flat else (1, c, 1, 1)
    sd = {
        f"{prefix}.weight": 1 + 0.2 * torch.randn(shape, generator=g),
        f"{prefix}.bias": 0.1 * torch.randn(shape, generator=g),
        f"{prefix}.mean_weight": torch.randn(k, generator=g),
        f"{prefix}.var_weight": torch.randn(k, generator=g),
    }
    if running:
        names = ("running_mean_bn", "running_var_bn") if flat else ("running_mean", "running_var")
        rshape = (1, c) if flat else (1, c, 1)
        sd[f"{prefix}.{names[0]}"] = 0.3 * torch.randn(rshape, generator=g)
        sd[f"{prefix}.{names[1]}"] = 0.5 + torch.rand(rshape, generator=g)
    return sd


def _official_checkpoint():
    sd = {"module.conv.weight": torch.randn(6, 3, 3, 3), "module.conv.bias": torch.zeros(6)}
    sd.update({f"module.{k}": v for k, v in _official_layer("sn", 6).items()})
    sd.update({f"module.{k}": v for k, v in _official_layer("sn_nobn", 6, k=2, running=False).items()})
    sd.update({f"module.{k}": v for k, v in _official_layer("head.sn", 4, k=2, flat=True).items()})
    sd.update({"module.head.fc.weight": torch.randn(4, 6), "module.head.fc.bias": torch.zeros(4)})
    return {"state_dict": sd, "epoch": 100}


class Net(nn.Module):
    def __init__(self, sources):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.sn = normkit.SwitchNorm2d(6, sources=sources["sn"])
        self.sn_nobn = normkit.SwitchNorm2d(6, sources=sources["sn_nobn"])
        self.head = nn.Sequential()
        self.head.fc = nn.Linear(6, 4)
        self.head.sn = normkit.SwitchNorm1d(4, sources=sources["head.sn"])


def test_keys_shapes_and_sources():
    checkpoint = _official_checkpoint()
    sources = normkit.official_sources(checkpoint)
    assert sources == {"sn": ("in", "ln", "bn"), "sn_nobn": ("in", "ln"), "head.sn": ("ln", "bn")}
    converted = normkit.load_official_switchnorm(checkpoint)
    official = checkpoint["state_dict"]
    assert converted["sn.weight"].shape == (6,) and converted["sn.running_var"].shape == (6,)
    assert torch.equal(converted["sn.mean_logits"], official["module.sn.mean_weight"])
    assert torch.equal(converted["head.sn.running_mean"], official["module.head.sn.running_mean_bn"].reshape(4))
    assert "sn_nobn.running_mean" not in converted and "head.sn.running_mean_bn" not in converted
    net = Net(sources)
    result = net.load_state_dict(converted)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(net.sn.num_batches_tracked) == 0


def test_loaded_layer_matches_the_official_formula():
    checkpoint = _official_checkpoint()
    net = Net(normkit.official_sources(checkpoint)).double()
    net.load_state_dict(normkit.load_official_switchnorm(checkpoint))
    official = checkpoint["state_dict"]
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    for name, layer in (("sn", net.sn), ("sn_nobn", net.sn_nobn)):
        p = {k[len(f"module.{name}."):]: v.double() for k, v in official.items() if k.startswith(f"module.{name}.")}
        running = (p["running_mean"].reshape(-1), p["running_var"].reshape(-1)) if "running_mean" in p else None
        expected = reference.switch_norm(
            x, layer.sources, torch.softmax(p["mean_weight"], 0).tolist(), torch.softmax(p["var_weight"], 0).tolist(),
            p["weight"].reshape(-1), p["bias"].reshape(-1), running=running,
        )
        torch.testing.assert_close(layer.eval()(x), expected)


def test_errors():
    bad = _official_layer("sn", 6)
    bad["sn.mean_weight"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"layer 'sn': expected mean_weight and var_weight of shape \(3,\) or \(2,\)"):
        normkit.load_official_switchnorm(bad)
    bad = _official_layer("sn", 6)
    bad["sn.running_var"] = torch.ones(1, 5, 1)
    with pytest.raises(ValueError, match=r"'sn.running_var': expected C=6 values.*got shape \(1, 5, 1\)"):
        normkit.load_official_switchnorm(bad)
