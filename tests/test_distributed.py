"""Synchronised BN / SN across gloo processes against one process on the concatenated batch.

Every multi-process check runs in one spawn per world size (2 and 3 ranks), guarded by a
deadline so that a hang fails fast. The children only run normkit and record tensors; the
parent compares them with the float64 references (reference.py: written from the definitions,
no Chan merge, no moments reuse), differentiated by autograd. The layers are every
configuration of the layer table (common_layers.py) that synchronises.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import os
import re
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normkit
import reference as ref
from common_layers import variant, variants
from normkit.distributed import all_merge_moments
from normkit.functional import Moments

TOL = dict(rtol=1e-10, atol=1e-10)
SPAWN_DEADLINE_S = 60
COLLECTIVE_TIMEOUT_S = 15
SN = ("in", "ln", "bn")


# --------------------------------------------------------------------------------------------
# float64 references (reference.py), differentiable


def ref_running(batches, start=None, masks=None):
    """Running mean / unbiased var (PyTorch convention, momentum 0.1) after training on ``batches``."""
    return ref.running_after(batches, 0.1, masks=masks, start=start)


class RefNorm(nn.Module):
    """The float64 reference as a layer with normkit's parameter and buffer names."""

    def __init__(self, c, sources):
        super().__init__()
        self.sources = sources
        self.weight = nn.Parameter(torch.ones(c, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(c, dtype=torch.float64))
        if len(sources) > 1:
            self.mean_logits = nn.Parameter(torch.zeros(len(sources), dtype=torch.float64))
            self.var_logits = nn.Parameter(torch.zeros(len(sources), dtype=torch.float64))
        else:
            self.mean_logits = self.var_logits = None
        self.register_buffer("running_mean", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("running_var", torch.ones(c, dtype=torch.float64))

    def forward(self, x):
        with torch.no_grad():
            rm, rv = ref_running([x.detach()], start=(self.running_mean, self.running_var))
            self.running_mean.copy_(rm)
            self.running_var.copy_(rv)
        return ref.from_params(x, self.sources, dict(self.named_parameters()))


# --------------------------------------------------------------------------------------------
# cases: a layer on a global batch split over the ranks


def _layer_case(name, kind, c, sizes, rest=(3, 2), steps=2, offset=0.0, seed=0, masked=False):
    """The table's configuration ``kind`` with ``c`` channels on (N, c, *rest) inputs."""
    sources = variant(kind).sources
    has = dict(variant(kind).build(c, len(rest)).named_parameters())
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    shape = (total, c, *rest)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + offset + torch.arange(c, dtype=torch.float64).reshape(1, c, *[1] * len(rest)) for _ in range(steps)]
    dys = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]
    params = {}
    if "weight" in has:
        params["weight"] = torch.randn(c, generator=g, dtype=torch.float64) + 1.0
    if "bias" in has:
        params["bias"] = torch.randn(c, generator=g, dtype=torch.float64)
    if len(sources) > 1:
        params["mean_logits"] = torch.randn(len(sources), generator=g, dtype=torch.float64) * 0.5
        params["var_logits"] = torch.randn(len(sources), generator=g, dtype=torch.float64) * 0.5
    case = dict(name=name, kind=kind, dim=len(rest), c=c, sources=sources, sizes=sizes, xs=xs, dys=dys, params=params, masks=None)
    if masked:  # padded tails of random lengths, at least 2 valid positions per sample
        length = math.prod(rest)
        keep = [torch.randint(2, length + 1, (total,), generator=g) for _ in range(steps)]
        case["masks"] = [(torch.arange(length) < k[:, None]).reshape(total, *rest) for k in keep]
    return case


def _make_layer(case, process_group):
    layer = variant(case["kind"]).build(case["c"], case["dim"], process_group=process_group, dtype=torch.float64)
    with torch.no_grad():
        for k, v in case["params"].items():
            getattr(layer, k).copy_(v)
    return layer


class _CollectiveCounter:
    """Counts ``dist.all_reduce`` calls; with ``forbid`` set, raises instead."""

    def __init__(self):
        self.calls, self.forbid, self.original = 0, False, dist.all_reduce

    def __call__(self, *args, **kwargs):
        if self.forbid:
            raise AssertionError("a collective ran where none was allowed")
        self.calls += 1
        return self.original(*args, **kwargs)


def _run_layer_case(case, rank, group, counter):
    lo = sum(case["sizes"][:rank])
    hi = lo + case["sizes"][rank]
    layer = _make_layer(case, group).train()
    out = {"steps": []}
    masks = case["masks"] or [None] * len(case["xs"])
    for x_all, dy_all, mask in zip(case["xs"], case["dys"], masks):
        x = x_all[lo:hi].clone().requires_grad_()
        before = counter.calls
        y = layer(x, None if mask is None else mask[lo:hi])
        forward_calls = counter.calls - before
        (y * dy_all[lo:hi]).sum().backward()
        step = {
            "y": y.detach(),
            "dx": x.grad,
            # (a one-source mix has constant weights: its logits get no gradient)
            "grads": {k: p.grad.clone() for k, p in layer.named_parameters() if p.grad is not None},
            "collectives": (forward_calls, counter.calls - before - forward_calls),
            "node": type(y.grad_fn).__name__,
        }
        if layer.running_mean is not None:
            step["running"] = (layer.running_mean.clone(), layer.running_var.clone())
        layer.zero_grad()
        out["steps"].append(step)
    # Eval and frozen layers never touch the process group.
    counter.forbid = True
    try:
        x, mask = case["xs"][0][lo:hi], masks[0]
        mask = None if mask is None else mask[lo:hi]
        if layer.running_mean is not None:
            layer.eval()
            out["eval"] = layer(x, mask)
            layer.train()
            layer.frozen = True
            out["frozen"] = layer(x, mask)
    finally:
        counter.forbid = False
    return out


# --------------------------------------------------------------------------------------------
# DDP: a small conv net trained for a few steps


def _make_net(sn_sources=SN, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        normkit.SwitchNorm2d(4, sources=sn_sources),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),  # torch's BN: convert(model, "sync") must turn it into normkit's
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).double()


def _ddp_case(name, sizes, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    data = [
        (torch.randn(total, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(total, 2, generator=g, dtype=torch.float64))
        for _ in range(steps)
    ]
    return dict(name=name, sizes=sizes, data=data)


# torch >= 2.13 renames broadcast_buffers (and warns on the old name).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _loss(out, target, world, total):
    """Sum of per-sample losses scaled by world / total: DDP's gradient average then equals
    the gradient of the mean loss over the concatenated batch, for uneven shards too."""
    return ((out - target) ** 2).sum() * (world / total)


def _run_ddp_case(case, rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    lo = sum(case["sizes"][:rank])
    hi = lo + case["sizes"][rank]
    net = normkit.convert(_make_net(), "sync")
    kinds = [type(m).__name__ for m in net if getattr(m, "process_group", None) is not None]
    # Running statistics must agree without DDP copying rank 0's buffers every step.
    model = DDP(net, **_NO_BUFFER_SYNC)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = sum(case["sizes"])
    for x, t in case["data"]:
        opt.zero_grad()
        _loss(model(x[lo:hi]), t[lo:hi], world, total).backward()
        opt.step()
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "synced": kinds}


def _recompute_share(batches, rank):
    return batches[: rank + 1] if rank < 2 else []  # 1, 2, 0 batches


def _run_recompute(rank, world):
    """recompute_stats on a synced model, ranks feeding different numbers of batches."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(2 + i, 3, 5, 5, generator=g, dtype=torch.float64) for i in range(3)]
    net = normkit.convert(_make_net(), "sync")
    normkit.recompute_stats(net, _recompute_share(batches, rank))
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "batches": batches}


# --------------------------------------------------------------------------------------------
# the spawned worker and its guard


def _worker(rank, world, init_file, out_dir, plan_file):
    """Run each section of the plan saved in ``plan_file``; record its results, or its
    traceback, per section. (A file, not a process argument: every tensor argument costs the
    forkserver a file descriptor, and it sends at most a few hundred.)"""
    plan = torch.load(plan_file, weights_only=False)
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # A collective that waits this long has lost its partner: error out instead of hanging.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    group = dist.group.WORLD
    counter = _CollectiveCounter()
    sections = [(c["name"], lambda c=c: _run_layer_case(c, rank, group, counter)) for c in plan["layers"]]
    sections += [(c["name"], lambda c=c: _run_ddp_case(c, rank, world)) for c in plan["ddp"]]
    sections += [("merge", lambda: _run_merge(rank, world))]
    sections += [("disagree", lambda: _run_disagreement(rank, group))]
    if plan["recompute"]:
        sections += [("recompute", lambda: _run_recompute(rank, world))]
    result: dict[str, Any] = {}
    for name, run in sections:
        dist.all_reduce = counter
        start = time.monotonic()
        try:
            result[name] = run()
        except BaseException:
            result[name] = {"error": traceback.format_exc()}
        finally:
            dist.all_reduce = counter.original
        result.setdefault("seconds", {})[name] = time.monotonic() - start
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run_disagreement(rank, group):
    """Ranks with different channel counts: an error on every rank, before any statistic moves."""
    layer = normkit.BatchNorm1d(3 + rank, process_group=group).train()
    try:
        layer(torch.randn(4, 3 + rank))
    except ValueError as error:
        return {"error_text": str(error), "running_mean": layer.running_mean.clone()}
    return {"error_text": None}


def _run_merge(rank, world):
    """all_merge_moments on its own: large offsets, an empty rank holding NaN, 1-rank groups."""
    g = torch.Generator().manual_seed(3)
    counts = [5, 0, 7][:world]
    values = [torch.randn(n, 3, generator=g, dtype=torch.float64) * 1e-2 + 1e6 for n in counts]
    mine = values[rank]
    if len(mine):
        m = Moments(torch.tensor([[float(len(mine))]], dtype=torch.float64), mine.mean(0, keepdim=True), mine.var(0, unbiased=False, keepdim=True))
    else:
        nan = torch.full((1, 3), float("nan"), dtype=torch.float64)
        m = Moments(torch.zeros(1, 1, dtype=torch.float64), nan, nan)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    out = {"merged": all_merge_moments(m), "solo": all_merge_moments(m, singles[rank]), "values": values}
    try:
        all_merge_moments(m, singles[(rank + 1) % world])
    except ValueError as e:
        out["not_member"] = str(e)
    return out


def _context():
    """A forkserver that imports torch (and DDP's torch._dynamo, ~10 s here) once for every
    rank of every spawn; plain spawn where there is no forkserver."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel", "normkit", "normkit.distributed", __name__])
    return ctx


def _spawn(world: int, plan: dict, tmp_path) -> list[dict]:
    ctx = _context()
    init_file = tmp_path / "rendezvous"
    plan_file = tmp_path / "plan.pt"
    torch.save(plan, plan_file)
    procs = [ctx.Process(target=_worker, args=(r, world, str(init_file), str(tmp_path), str(plan_file)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    results = []
    for r, p in enumerate(procs):
        path = tmp_path / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {})
        results[-1]["exitcode"] = p.exitcode
    return results


# --------------------------------------------------------------------------------------------
# plans: one spawn per world size

# Every synchronising configuration of the table on uneven shards and with masks (3 channels,
# or the least multiple its group counts divide); then the edge cases.
# (SSN's sparsestmax weights and BRN's correction are not what the reference mixes: their own
# two-process tests are in test_sparse_switch_norm.py / test_batch_renorm.py)
SYNCED = [v.variant for v in variants(sync=True, kind=("bn", "sn"))]
LAYERS = {
    2: [
        *(_layer_case(f"{k}-uneven", k, variant(k).channels(3), (5, 3)) for k in SYNCED),
        *(_layer_case(f"{k}-masked", k, variant(k).channels(3), (3, 2), rest=(6,), masked=True) for k in SYNCED),
        _layer_case("sn-empty", "sn", 3, (0, 4)),
        _layer_case("sn-in-bn-1d", "sn-in-bn", 4, (2, 3), rest=(5,)),
        _layer_case("bn-empty", "bn", 3, (0, 4)),
        _layer_case("bn-offset", "bn", 2, (3, 4), offset=1e4),
    ],
    3: [
        _layer_case("sn-3", "sn", 3, (3, 0, 2)),
        _layer_case("bn-3", "bn", 2, (1, 2, 4)),
    ],
}
DDP_CASES = {2: [_ddp_case("ddp-equal", (4, 4)), _ddp_case("ddp-uneven", (5, 3))], 3: [_ddp_case("ddp-3-empty", (3, 0, 2))]}
_SPAWNED: dict[int, list[dict]] = {}


def _results(world, section, tmp_path_factory) -> list[Any]:
    """Each rank's results of one section, spawning the world's plan on first use."""
    if world not in _SPAWNED:
        plan = {"layers": LAYERS[world], "ddp": DDP_CASES[world], "recompute": world == 3}
        _SPAWNED[world] = _spawn(world, plan, tmp_path_factory.mktemp(f"world{world}"))
    out = []
    for r, res in enumerate(_SPAWNED[world]):
        if section not in res:
            pytest.fail(f"rank {r} of {world} has no result for {section!r} (exit code {res['exitcode']}; "
                        f"killed after {SPAWN_DEADLINE_S} s if None: a hang)")
        if isinstance(res[section], dict) and "error" in res[section]:
            pytest.fail(f"rank {r} of {world} failed in {section!r}:\n{res[section]['error']}")
        out.append(res[section])
    return out


def _case(world, name):
    return next(c for c in LAYERS[world] + DDP_CASES[world] if c["name"] == name)


def _ref_model(net):
    """The same network with every norm replaced by its float64 reference."""
    ref_net = nn.Sequential(*[RefNorm(m.num_features, getattr(m, "sources", ("bn",))) if "Norm" in type(m).__name__ else m for m in net])
    missing, unexpected = ref_net.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.endswith("num_batches_tracked") for k in unexpected)
    return ref_net


# --------------------------------------------------------------------------------------------
# the checks


LAYER_IDS = [(w, c["name"]) for w in LAYERS for c in LAYERS[w]]


@pytest.mark.parametrize("world,name", LAYER_IDS, ids=[f"{w}-{n}" for w, n in LAYER_IDS])
def test_layer_matches_one_process(world, name, tmp_path_factory):
    results = _results(world, name, tmp_path_factory)
    case = _case(world, name)
    sizes, sources = case["sizes"], case["sources"]
    bounds = [sum(sizes[:r]) for r in range(world + 1)]
    has_bn = "bn" in sources
    masks = case["masks"] or [None] * len(case["xs"])
    for step, (x, dy, mask) in enumerate(zip(case["xs"], case["dys"], masks)):
        x = x.clone().requires_grad_()
        params = {k: v.clone().requires_grad_() for k, v in case["params"].items()}
        y = ref.from_params(x, sources, params, mask=mask)
        (y * dy).sum().backward()
        for r in range(world):
            got = results[r]["steps"][step]
            lo, hi = bounds[r], bounds[r + 1]
            torch.testing.assert_close(got["y"], y.detach()[lo:hi], **TOL)
            torch.testing.assert_close(got["dx"], x.grad[lo:hi], **TOL)
            # one collective forward and one backward per layer with a BN source, none without
            # (plus, on the first call, the check that every rank has the same channels and dtype)
            assert got["collectives"] == ((1 + (step == 0), 1) if has_bn else (0, 0))
            if has_bn and mask is None and hi > lo and normkit.kernels.load("cpu") is not None:
                # synced, unmasked, not empty: the fused passes around the mix, not the reference ops
                assert got["node"] == "_GenericNormBackward", got["node"]
            if has_bn:
                ref_rm, ref_rv = ref_running(case["xs"][: step + 1], masks=case["masks"])
                torch.testing.assert_close(got["running"][0], ref_rm, **TOL)
                torch.testing.assert_close(got["running"][1], ref_rv, **TOL)
                # bit-identical on every rank, not merely close
                assert torch.equal(got["running"][0], results[0]["steps"][step]["running"][0])
                assert torch.equal(got["running"][1], results[0]["steps"][step]["running"][1])
        # Each rank holds its share of the parameter gradients (x, gamma, beta, logits); their
        # sum is the one-process gradient (DDP sums them, then divides by the world size).
        for k, p in params.items():
            total = sum(results[r]["steps"][step]["grads"][k] for r in range(world))
            torch.testing.assert_close(total, p.grad, **TOL)
    if has_bn:  # eval and frozen ran with collectives forbidden, on the running statistics
        running = ref_running(case["xs"], masks=case["masks"])
        for r in range(world):
            lo, hi = bounds[r], bounds[r + 1]
            mask = None if case["masks"] is None else case["masks"][0][lo:hi]
            expected = ref.from_params(case["xs"][0][lo:hi], sources, case["params"], mask=mask, running=running)
            torch.testing.assert_close(results[r]["eval"], expected, **TOL)
            torch.testing.assert_close(results[r]["frozen"], expected, **TOL)


DDP_IDS = [(w, c["name"]) for w in DDP_CASES for c in DDP_CASES[w]]


@pytest.mark.parametrize("world,name", DDP_IDS, ids=[f"{w}-{n}" for w, n in DDP_IDS])
def test_ddp_training_matches_one_process(world, name, tmp_path_factory):
    results = _results(world, name, tmp_path_factory)
    case = _case(world, name)
    ref_net = _ref_model(_make_net())
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    for x, t in case["data"]:
        opt.zero_grad()
        ((ref_net(x) - t) ** 2).mean(0).sum().backward()  # mean loss over the whole batch
        opt.step()
    for r in range(world):
        assert results[r]["synced"] == ["SwitchNorm2d", "BatchNorm2d"]
        state = results[r]["state"]
        for k, v in ref_net.state_dict().items():
            torch.testing.assert_close(state[k], v, **TOL, msg=lambda m: f"rank {r}, {k}: {m}")
            assert torch.equal(state[k], results[0]["state"][k]), f"rank {r} differs from rank 0 in {k}"
        assert int(state["1.num_batches_tracked"]) == len(case["data"])


@pytest.mark.parametrize("world", [2, 3])
def test_all_merge_moments_exact(world, tmp_path_factory):
    results = _results(world, "merge", tmp_path_factory)
    values = torch.cat(results[0]["values"])
    for r in range(world):
        merged = results[r]["merged"]
        assert merged.mean.shape == merged.var.shape == merged.count.shape == (1, 3)
        assert (merged.count == len(values)).all()
        # offset 1e6, spread 1e-2: power sums would lose every digit of the variance here
        torch.testing.assert_close(merged.mean, values.mean(0, keepdim=True), rtol=1e-15, atol=0)
        torch.testing.assert_close(merged.var, values.var(0, unbiased=False, keepdim=True), rtol=1e-6, atol=0)
        mine, solo = results[r]["values"][r], results[r]["solo"]
        assert (solo.count == len(mine)).all()
        if len(mine):  # a 1-rank group: this rank's statistics unchanged
            torch.testing.assert_close(solo.mean, mine.mean(0, keepdim=True), rtol=0, atol=0)
        else:  # an empty rank's NaN placeholders never come out
            assert (solo.mean == 0).all() and (solo.var == 0).all()
        assert "is not a member of the process group" in results[r]["not_member"]


def test_recompute_stats_merges_across_ranks(tmp_path_factory):
    world = 3
    results = _results(world, "recompute", tmp_path_factory)
    batches = results[0]["batches"]
    fed = [b for r in range(world) for b in _recompute_share(batches, r)]
    ref_net = _ref_model(_make_net())
    inputs: dict[int, list] = {1: [], 4: []}  # each norm's input, upstream norms on batch stats
    with torch.no_grad():
        for h in fed:
            for i, m in enumerate(ref_net):
                if i in inputs:
                    inputs[i].append(h)
                h = m(h)
    for i, xs in inputs.items():
        mean, var = ref.pooled(xs)
        for r in range(world):
            state = results[r]["state"]
            torch.testing.assert_close(state[f"{i}.running_mean"], mean, **TOL)
            torch.testing.assert_close(state[f"{i}.running_var"], var, **TOL)


# --------------------------------------------------------------------------------------------
# single process: no collective, ever


@pytest.fixture
def no_collectives(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective ran in single-process use")

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
        monkeypatch.setattr(dist, name, forbidden)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_that_disagree_on_channels_all_raise(world, tmp_path_factory):
    for rank, got in enumerate(_results(world, "disagree", tmp_path_factory)):
        assert got["error_text"] is not None, f"rank {rank} did not raise"
        assert re.search(rf"same channel count and dtype on every rank.*rank {rank} has {3 + rank} channels of "
                         rf"float32, the group has channel counts from 3 to {2 + world}", got["error_text"])
        assert torch.equal(got["running_mean"], torch.zeros(3 + rank))


@pytest.mark.parametrize("kind", SYNCED)
def test_single_process_never_touches_the_group(kind, no_collectives):
    assert not dist.is_initialized()
    c = variant(kind).channels(3)
    layer = variant(kind).build(c, 2, process_group=object(), dtype=torch.float64)  # any group: it must not be used
    x = torch.randn(4, c, 2, 2, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    expected = ref.of_layer(layer, x.detach(), variant(kind).sources)
    torch.testing.assert_close(y.detach(), expected.detach(), **TOL)
    layer.eval()
    layer(x)


def test_all_merge_moments_needs_initialised_distributed():
    m = Moments(torch.ones(1, 1), torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match=r"torch.distributed.is_initialized\(\) is False.*init_process_group"):
        all_merge_moments(m)


def test_a_failed_exchange_says_what_to_check(monkeypatch):
    """A peer that stops answering ends in the collective's own timeout error; the layer's
    error says what was being exchanged and what to check."""
    import normkit.distributed as nd

    def timed_out(*args, **kwargs):
        raise RuntimeError("[gloo] Timed out waiting 15000ms for recv operation to complete")

    monkeypatch.setattr(dist, "all_reduce", timed_out)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match=r"exchanging batch statistics across the 2 processes(.|\n)*"
                                           r"init_process_group\(timeout=...\)(.|\n)*Timed out waiting"):
        nd._all_reduce(torch.zeros(3), dist.ReduceOp.SUM, None)
