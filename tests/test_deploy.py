"""harden, fuse and ONNX export of a hardened, fused model."""

import pytest
import torch
from torch import nn

import normkit
import reference


def _one_hot_sn(c, source_index, sources=("in", "ln", "bn"), cls=normkit.SwitchNorm2d, logit=40.0, **kw):
    sn = cls(c, sources=sources, **kw).double()
    with torch.no_grad():
        logits = torch.full((len(sources),), -logit, dtype=torch.float64)
        logits[source_index] = logit
        sn.mean_logits.copy_(logits)
        sn.var_logits.copy_(logits)
        sn.weight.uniform_(0.5, 1.5)
        sn.bias.uniform_(-0.5, 0.5)
        if sn.running_mean is not None:
            sn.running_mean.uniform_(-1, 1)
            sn.running_var.uniform_(0.5, 2)
            sn.num_batches_tracked.fill_(9)
    return sn


@pytest.mark.parametrize(
    "index, sources, expected",
    [(2, ("in", "ln", "bn"), normkit.BatchNorm2d), (0, ("in", "ln", "bn"), normkit.InstanceNorm2d),
     (1, ("in", "ln", "bn"), normkit.GroupNorm), (1, ("in", "gn2"), normkit.GroupNorm)],
)
def test_harden_one_hot_equals_reference_in_eval_and_train(index, sources, expected):
    sn = _one_hot_sn(4, index, sources)
    hardened = normkit.harden(nn.Sequential(sn))[0]
    assert type(hardened) is expected and hardened.weight.dtype == torch.float64 and hardened.training
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2 + 1
    weights = [1.0 if i == index else 0.0 for i in range(len(sources))]
    running = (sn.running_mean, sn.running_var) if sources[index] == "bn" else None
    expected_eval = reference.switch_norm(x, sources, weights, weights, sn.weight.detach(), sn.bias.detach(), running=running)
    torch.testing.assert_close(hardened.eval()(x), expected_eval.to(torch.float64), rtol=1e-10, atol=1e-10)
    expected_train = reference.switch_norm(x, sources, weights, weights, sn.weight.detach(), sn.bias.detach())
    torch.testing.assert_close(hardened.train()(x), expected_train, rtol=1e-10, atol=1e-10)
    if expected is normkit.BatchNorm2d:
        assert int(hardened.num_batches_tracked) == 10  # 9 carried + the train call above
    if sources[index] == "gn2":
        assert hardened.num_groups == 2


def test_harden_leaves_undecided_layers_and_checks_threshold():
    mixed = normkit.SwitchNorm2d(4)
    mean_only = _one_hot_sn(4, 2)
    with torch.no_grad():
        mean_only.var_logits.zero_()
    close = _one_hot_sn(4, 2, logit=3.0)  # weight e^3/(e^3+2e^-3) = 0.9951 on BN
    net = normkit.harden(nn.Sequential(mixed, mean_only, close), threshold=0.99)
    assert net[0] is mixed and net[1] is mean_only and type(net[2]) is normkit.BatchNorm2d
    assert type(normkit.harden(_one_hot_sn(4, 2, logit=3.0), threshold=0.999)) is normkit.SwitchNorm2d
    with pytest.raises(ValueError, match=r"threshold must be in \(0.5, 1\].*got 0.4"):
        normkit.harden(net, threshold=0.4)


def _conv_bn_net(bn_cls):
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), bn_cls(6), nn.ReLU(),
        nn.Sequential(normkit.WSConv2d(6, 6, 3, groups=2), bn_cls(6)),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3), normkit.BatchNorm1d(3, axis=-1),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, normkit.BatchNorm1d, normkit.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, normkit.BatchNorm2d])
def test_fuse_folds_every_bn_after_conv_or_linear(bn_cls):
    net = _conv_bn_net(bn_cls)
    x = torch.randn(4, 3, 8, 8)
    expected = net(x)
    normkit.fuse(net)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, normkit.BatchNorm2d, normkit.BatchNorm1d))
                   for m in net.modules())
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_fuse_pairs_training_bn_and_errors():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn1(self.conv1(x)))

    net = nn.Sequential(Block()).eval()
    with torch.no_grad():
        net[0].bn1.running_var.fill_(3.0)
    x = torch.randn(2, 2, 3, 3)
    expected = net(x)
    _, done = normkit.fuse(net, report=True)  # found by tracing, though not in a Sequential
    assert isinstance(net[0].bn1, nn.Identity) and done.folded == [("0.conv1", "0.bn1")] and not done.left
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    net = nn.Sequential(Block()).eval()
    normkit.fuse(net, pairs=[("0.conv1", "0.bn1")])  # named pairs are folded once
    assert isinstance(net[0].bn1, nn.Identity)

    training = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)).train()
    _, done = normkit.fuse(training, report=True)
    assert isinstance(training[1], nn.BatchNorm2d) and done.left == [("1", done.left[0][1])]
    assert "training mode" in done.left[0][1]
    with pytest.raises(ValueError, match="training mode.*call model.eval"):
        normkit.fuse(training, pairs=[("0", "1")])
    with pytest.raises(ValueError, match="no module at path 'nope'"):
        normkit.fuse(training.eval(), pairs=[("0", "nope")])
    with pytest.raises(ValueError, match="cannot fold GroupNorm into Conv2d"):
        normkit.fuse_conv_bn(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export internals (treespec LeafSpec)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_hardened_fused_model_exports_to_onnx_and_matches(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript")
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), _one_hot_sn(8, 2).float(), nn.ReLU(),
        nn.Conv2d(8, 8, 3), _one_hot_sn(8, 1).float(), nn.ReLU(),
        nn.Conv2d(8, 8, 1), _one_hot_sn(8, 0).float(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net(x).detach()
    normkit.fuse(normkit.harden(net))
    assert isinstance(net[1], nn.Identity) and type(net[4]) is normkit.GroupNorm
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    path = tmp_path / "model.onnx"
    torch.onnx.export(net, (x,), str(path), verbose=False)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-5)
