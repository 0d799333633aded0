"""Synchronised Switchable Normalization under DistributedDataParallel.

Run on CPU (gloo), two processes::

    torchrun --nproc_per_node=2 examples/ddp_train.py

or on GPUs (NCCL, one process per GPU)::

    torchrun --nproc_per_node=NUM_GPUS examples/ddp_train.py --device cuda --dtype float32

Every rank draws the same global batches and trains on its own, deliberately uneven, shard
(rank r gets 3 + r samples). ``normkit.convert(model, "sync")`` turns torch's BatchNorm into
normkit's and makes every normkit BN / SN merge its batch statistics across the ranks, so the
run matches one process training on the concatenated batch. After each step the script
prints whether the running statistics are identical on every rank; at the end rank 0 trains
the unsynchronised model on the full batches and prints the largest parameter difference.
See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import argparse
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import normkit


def make_model(dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in the check
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        normkit.SwitchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).to(device=device, dtype=dtype)


def shard_bounds(rank: int, world: int) -> tuple[int, int, int]:
    """Rank r's slice of the global batch, uneven on purpose: sizes 3, 4, 5, ..."""
    sizes = [3 + r for r in range(world)]
    return sum(sizes[:rank]), sum(sizes[: rank + 1]), sum(sizes)


def global_batches(steps: int, total: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(total, 3, 8, 8, generator=g, dtype=torch.float64) + 2.0
        y = torch.randint(0, 4, (total,), generator=g)
        yield x.to(device=device, dtype=dtype), y.to(device)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, world: int, total: int) -> torch.Tensor:
    # Sum over this shard times world / total: DDP averages gradients over ranks, so this is the
    # gradient of the mean loss over the whole global batch, even with uneven shards.
    return nn.functional.cross_entropy(logits, target, reduction="sum") * (world / total)


def same_on_every_rank(t: torch.Tensor) -> bool:
    lo, hi = t.detach().clone(), t.detach().clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)  # before any CUDA work: one GPU per process
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # convert after init_process_group: "sync" binds torch.distributed.group.WORLD.
    model = normkit.convert(make_model(dtype, device), "sync")
    # Synced running statistics are equal on every rank already: no need for DDP to copy them.
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else {"broadcast_buffers": False}
    )
    ddp = DDP(model, device_ids=[local_rank] if args.device == "cuda" else None, **no_buffer_sync)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    lo, hi, total = shard_bounds(rank, world)
    batches = list(global_batches(args.steps, total, dtype, device))

    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = loss_fn(ddp(x[lo:hi]), y[lo:hi], world, total)
        loss.backward()
        opt.step()
        equal = all(same_on_every_rank(b) for name, b in model.named_buffers() if "running" in name)
        if rank == 0:
            weights = model[1].mean_weights.detach().cpu().numpy().round(4)
            print(f"step {step}: running stats identical on all {world} ranks: {equal}; "
                  f"SN mean weights (in, ln, bn) {weights}", flush=True)

    if rank == 0:
        # One process, the whole batch, no synchronisation: the run it should reproduce.
        single = make_model(dtype, device)
        opt1 = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
        for x, y in batches:
            opt1.zero_grad()
            nn.functional.cross_entropy(single(x), y).backward()
            opt1.step()
        ours = model.state_dict()
        diff = max((ours[k].double() - v.double()).abs().max().item() for k, v in single.state_dict().items())
        print(f"largest difference to one process on the concatenated batch: {diff:.3g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
