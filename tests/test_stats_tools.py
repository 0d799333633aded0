"""recompute_stats, freeze_stats, unfreeze_stats, reset_stats against float64 references
(reference.py), over every layer of the table (common_layers.py) that keeps running statistics
and torch's own."""

import pytest
import torch
from torch import nn

import normkit
import reference as ref
from common_layers import variants


def _uneven(c=3, spatial=(4, 5), offset=1e4, sizes=(3, 5, 2, 7)):
    return [offset + torch.randn(n, c, *spatial) * (1 + torch.arange(c).reshape(1, c, *([1] * len(spatial)))) for n in sizes]


def _layers(running, **torch_layers):
    """(id, make(c), channels) of every table configuration that keeps ``running`` statistics
    (as 2-D layers, 3 channels or the least multiple its group counts divide), then torch's."""
    rows = [(v.variant, lambda c, v=v: v.build(c, 2, tracking=True), v.channels(3)) for v in variants(running=running)]
    return rows + [(name, make, 3) for name, make in torch_layers.items()]


def _params(rows):
    return pytest.mark.parametrize("make,c", [r[1:] for r in rows], ids=[r[0] for r in rows])


BN_LAYERS = _layers("bn", torch_bn=lambda c: nn.BatchNorm2d(c), torch_bn_cumulative=lambda c: nn.BatchNorm2d(c, momentum=None))


@_params(BN_LAYERS)
def test_uneven_batches_large_offset_exact_population_stats(make, c):
    layer = make(c)
    batches = _uneven(c)
    report = normkit.recompute_stats(nn.Sequential(layer), batches)
    mean, var = ref.pooled(batches)
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-6, atol=0)
    assert (report.batches, report.samples, report.updated, report.unreached) == (4, 17, ["0"], [])
    assert int(layer.num_batches_tracked) == 4


def test_channels_last_and_flat_inputs():
    bn_last = normkit.BatchNorm2d(3, axis=-1)
    batches = [torch.randn(n, 4, 5, 3) + 7 for n in (2, 6)]
    normkit.recompute_stats(bn_last, batches)
    mean, var = ref.pooled(batches, axis=-1)
    torch.testing.assert_close(bn_last.running_var.double(), var, rtol=1e-6, atol=0)
    flat = nn.BatchNorm1d(3)
    batches = [torch.randn(n, 3) * 2 for n in (2, 9, 4)]
    normkit.recompute_stats(flat, batches)
    mean, var = ref.pooled(batches)
    torch.testing.assert_close(flat.running_mean.double(), mean, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(flat.running_var.double(), var, rtol=1e-6, atol=0)


def test_downstream_layers_see_batch_normalised_activations():
    first, conv, second = normkit.BatchNorm2d(2), nn.Conv2d(2, 3, 1), normkit.BatchNorm2d(3)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([2.0, 0.5]))
        first.bias.copy_(torch.tensor([1.0, -1.0]))
        first.running_mean.fill_(100.0)  # eval mode would use these: must not happen
    model = nn.Sequential(first, conv, second).eval()
    batches = [torch.randn(n, 2, 3, 3) * 3 + 1 for n in (4, 2, 5)]
    normkit.recompute_stats(model, batches)
    seen = []
    w, b = conv.weight.double(), conv.bias.double()
    for x in batches:
        xd = x.double()
        mu = xd.mean((0, 2, 3), keepdim=True)
        var = xd.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (xd - mu) / torch.sqrt(var + 1e-5) * torch.tensor([2.0, 0.5]).double().reshape(1, 2, 1, 1)
        h = h + torch.tensor([1.0, -1.0]).double().reshape(1, 2, 1, 1)
        seen.append(torch.nn.functional.conv2d(h, w, b))
    mean, var = ref.pooled(seen)
    torch.testing.assert_close(second.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second.running_var.double(), var, rtol=1e-5, atol=1e-6)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = normkit.BatchNorm2d(3, momentum=None)
        self.drop = nn.Dropout(0.5)
        self.tbn = nn.BatchNorm2d(3, momentum=0.3)
        self.unused = normkit.SwitchNorm2d(3)
        self.frozen_bn = normkit.BatchNorm2d(3, frozen=True)

    def forward(self, x, mask=None):
        return self.frozen_bn(self.tbn(self.drop(self.bn(x, mask=mask))))


def test_modes_momentum_restored_frozen_untouched_unreached_reported():
    net = _Net().train()
    net.tbn.eval()
    net.bn.num_batches_tracked.fill_(50)
    before = {m: m.training for m in net.modules()}
    frozen_mean = net.frozen_bn.running_mean.clone()
    report = normkit.recompute_stats(net, iter(_uneven(sizes=(4, 4, 4))), num_batches=2)
    assert {m: m.training for m in net.modules()} == before
    assert net.bn.momentum is None and net.tbn.momentum == 0.3
    assert report.batches == 2 and report.samples == 8
    assert report.updated == ["bn", "tbn"] and report.unreached == ["unused"] and report.frozen == ["frozen_bn"]
    assert torch.equal(net.frozen_bn.running_mean, frozen_mean)
    assert int(net.unused.num_batches_tracked) == 0 and int(net.bn.num_batches_tracked) == 2
    text = str(report)
    assert "2 batches (8 samples)" in text and "2 layers updated" in text and "never reached: unused" in text


def test_short_loader_dict_batches_with_mask_and_custom_forward():
    net = _Net()
    x = [torch.randn(n, 3, 2, 6) for n in (3, 4)]
    masks = [torch.rand(n, 2, 6) > 0.3 for n in (3, 4)]
    report = normkit.recompute_stats(net, [{"x": a, "mask": m} for a, m in zip(x, masks)], num_batches=10)
    assert report.batches == 2 and report.samples == 7
    mean, var = ref.pooled(x, masks=masks)
    torch.testing.assert_close(net.bn.running_mean.double(), mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(net.bn.running_var.double(), var, rtol=1e-6, atol=1e-9)
    calls = []
    normkit.recompute_stats(net, [("ignored", x[0])], forward=lambda model, batch: calls.append(model(batch[1])))
    assert len(calls) == 1
    torch.testing.assert_close(net.bn.running_mean.double(), ref.pooled([x[0]])[0], rtol=1e-6, atol=1e-9)


@_params(_layers("in", torch_in=lambda c: nn.InstanceNorm2d(c, track_running_stats=True)))
def test_instance_norm_running_stats_follow_torch_definition(make, c):
    layer = make(c)
    batches = _uneven(c, offset=5.0, sizes=(2, 3))
    normkit.recompute_stats(layer, batches)
    mean, var = ref.pooled(batches, kind="in")  # mean over samples of per-sample estimates
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-6, atol=0)


def test_errors_and_restoration_after_failure():
    bn = normkit.BatchNorm2d(3)
    with pytest.raises(ValueError, match="got no batch"):
        normkit.recompute_stats(bn, [])
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        normkit.recompute_stats(bn, [torch.randn(2, 3, 2, 2)], num_batches=0)
    with pytest.raises(TypeError, match="cannot feed a batch of type int"):
        normkit.recompute_stats(bn, [3])
    bn.eval()
    with pytest.raises(ValueError, match="expects 3 channels"):
        normkit.recompute_stats(bn, [torch.randn(2, 4, 2, 2)])
    assert not bn.training and bn.momentum == 0.1 and not bn._forward_pre_hooks


@_params(_layers("bn", torch_bn=lambda c: nn.BatchNorm2d(c)))
def test_freeze_survives_train_and_unfreeze_restores(make, c):
    layer = make(c)
    frozen_mean = torch.tensor([1.0, 2.0, 3.0]).repeat(c // 3)
    with torch.no_grad():
        layer.running_mean.copy_(frozen_mean)
        layer.running_var.copy_(torch.tensor([4.0, 0.5, 2.0]).repeat(c // 3))
    x = torch.randn(4, c, 5, 5)
    expected = layer.eval()(x)
    normkit.freeze_stats(layer).train()
    y = layer(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert (layer.weight is None or layer.weight.grad is not None) and layer.training  # None: affine=False
    torch.testing.assert_close(layer.running_mean, frozen_mean)
    assert int(layer.num_batches_tracked) == 0
    normkit.unfreeze_stats(layer)
    layer(x)
    assert int(layer.num_batches_tracked) == 1 and not getattr(layer, "frozen", False)
    assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_reset_stats_skips_frozen():
    net = nn.Sequential(normkit.BatchNorm2d(2), nn.BatchNorm2d(2), normkit.BatchNorm2d(2, frozen=True), nn.GroupNorm(1, 2))
    for m in list(net)[:3]:
        m.running_mean.fill_(3.0)
        m.num_batches_tracked.fill_(7)
    assert normkit.reset_stats(net) == 2
    for m in list(net)[:2]:
        assert torch.equal(m.running_mean, torch.zeros(2)) and torch.equal(m.running_var, torch.ones(2))
        assert int(m.num_batches_tracked) == 0
    assert torch.equal(net[2].running_mean, torch.full((2,), 3.0))


def _rank_batches(rank):
    g = torch.Generator().manual_seed(10)
    every = [1e3 + torch.randn(n, 3, 2, 3, generator=g) for n in (3, 5, 2)]
    return every, (every[:2] if rank == 0 else every[2:])


def _recompute_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(normkit.BatchNorm2d(3), nn.BatchNorm2d(3))
        report = normkit.recompute_stats(net, _rank_batches(rank)[1])
        torch.save({"stats": [net[0].running_mean, net[0].running_var, net[1].running_var],
                    "updated": report.updated}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_recompute_merges_exactly_across_ranks(tmp_path):
    torch.multiprocessing.spawn(_recompute_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    every = _rank_batches(0)[0]
    mean, var = ref.pooled(every)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["updated"] == ["0", "1"]
        torch.testing.assert_close(saved["stats"][0].double(), mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(saved["stats"][1].double(), var, rtol=1e-6, atol=0)
