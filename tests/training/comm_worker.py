"""Run under torchrun (4 ranks) by test_comm.py: the all-reduce strategies against a plain
all-reduce, on one process group, in one launch. Rank 0 writes OUT.json:

- ``buffers``: for node sizes 1, 2 and 4 and buffer lengths that do and do not divide into
  chunks (1 entry, fewer than the ranks, odd, large), the largest difference between the
  hierarchical average and ``dist.all_reduce`` / world — and whether all ranks agree;
- ``training``: 12 SGD steps of a small MLP whose ranks see different data, its gradients
  averaged by DDP's ring, by DDP with the hierarchical hook (2 nodes × 2), and by the flat
  all-reduce after backward: the per-step losses of each, and the final weights' largest
  difference from the ring's;
- ``compressed``: the hierarchical hook with fp16 compression of the cross-node step:
  bytes counted per step against the dense payload of the cross-node shard;
- ``decentral``: parameter mixing alone, 4 rounds, from parameters r + 1 on rank r: the
  mean and the spread across ranks after each round, and the bytes each rank sent, for
  gossip on the ring and the exponential graph, local SGD and DiLoCo (2 local steps);
- ``wire``: bytes each rank put on loopback (``/proc/net/dev``) for one average of a 4 MB
  buffer by a plain all-reduce, the hierarchical one (2 × 2) and a gossip ring round.

    torchrun --nproc-per-node 4 tests/training/comm_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.comm import (
    Decentralized,
    FlatAllReduce,
    Gossip,
    HierarchicalAllReduce,
    LocalSGD,
    node_grid,
)
from trainer.comm.model import loopback_bytes
from trainer.compression import build_compressor
from trainer.config import CompressionConfig

LENGTHS = (1, 3, 1001, 65536)
STEPS = 12


def buffers(rank: int, world: int) -> dict[str, Any]:
    result = {}
    for node_size in (1, 2, 4):
        hierarchical = HierarchicalAllReduce(*node_grid("cpu", node_size))
        for length in LENGTHS:
            data = torch.randn(length, generator=torch.Generator().manual_seed(rank * 7 + length))
            exact = data.clone()
            dist.all_reduce(exact)
            exact /= world
            got = hierarchical.average(data.clone())
            everyone = [torch.empty_like(got) for _ in range(world)]
            dist.all_gather(everyone, got)
            result[f"{node_size}x{length}"] = {
                "max_diff": float((got - exact).abs().max()),
                "ranks_agree": all(torch.equal(other, got) for other in everyone),
            }
    return result


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))  # fmt: skip


def train(rank: int, how: str) -> tuple[list[float], nn.Module]:
    model = mlp()
    flat = None
    if how == "flat":
        flat = FlatAllReduce([model], dist.group.WORLD)  # type: ignore[arg-type]
        net: nn.Module = model
    else:
        # Small buckets: several per step, so the hook runs on many buffer layouts.
        net = DistributedDataParallel(model, bucket_cap_mb=0.004)
        if how == "hierarchical":
            net.register_comm_hook(None, HierarchicalAllReduce(*node_grid("cpu", 2)).hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1000 + rank)
    losses = []
    for _ in range(STEPS):
        inputs = torch.randn(16, 32, generator=generator)
        targets = torch.randint(0, 10, (16,), generator=generator)
        loss = nn.functional.cross_entropy(net(inputs), targets)
        loss.backward()
        if flat is not None:
            flat.sync()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return losses, model


def compressed(rank: int) -> dict[str, Any]:
    compressor = build_compressor(CompressionConfig(method="fp16"))
    assert compressor is not None
    compressor.warmup_steps = 0
    model = mlp()
    compressor.name_parameters(model)
    net = DistributedDataParallel(model, bucket_cap_mb=1000)
    net.register_comm_hook(None, HierarchicalAllReduce(*node_grid("cpu", 2), compressor).hook)
    inputs = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank))
    net(inputs).square().mean().backward()
    sent, dense = compressor.take_bytes()
    entries = sum(p.numel() for p in model.parameters())
    return {"sent": sent, "dense": dense, "entries": entries}


def decentral(rank: int, world: int) -> dict[str, Any]:
    """Parameter mixing alone (no training): rank r starts from the constant r + 1."""
    result = {}
    for name in ("ring", "exponential", "local_sgd", "diloco"):
        model = nn.Linear(8, 8)
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(rank + 1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        mixer: Decentralized
        if name in ("ring", "exponential"):
            mixer = Gossip([model], [optimizer], dist.group.WORLD, name)  # type: ignore[arg-type]
        else:
            outer = (0.7, 0.9) if name == "diloco" else (1.0, 0.0)
            mixer = LocalSGD([model], [optimizer], dist.group.WORLD,  # type: ignore[arg-type]
                             local_steps=2, outer_lr=outer[0], outer_momentum=outer[1])  # fmt: skip
        means, spreads, sent = [], [], []
        for _ in range(4):
            mixer.after_step()
            flat = mixer.flat()
            everyone = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(everyone, flat)
            stacked = torch.stack(everyone)
            means.append(float(stacked.mean()))
            spreads.append(float(stacked.max() - stacked.min()))
            sent.append(mixer.take_bytes())
        result[name] = {"means": means, "spreads": spreads, "sent": sent,
                        "entries": flat.numel()}  # fmt: skip
    return result


def wire(rank: int, world: int) -> dict[str, Any]:
    """Bytes on loopback per rank for one average of a 4 MB buffer, per strategy."""
    entries = 1 << 20
    data = torch.randn(entries, generator=torch.Generator().manual_seed(rank))
    hierarchical = HierarchicalAllReduce(*node_grid("cpu", 2))
    model = nn.Linear(1024, 1024, bias=False)  # 4 MB of parameters
    gossip = Gossip([model], [], dist.group.WORLD, "ring")  # type: ignore[arg-type]
    cases = {
        "ring": lambda: dist.all_reduce(data),
        "hierarchical": lambda: hierarchical.average(data),
        "gossip-ring": gossip.after_step,
    }
    result = {"bytes": entries * 4}
    for name, run in cases.items():
        run()  # connections set up before counting
        dist.barrier()
        before = loopback_bytes()
        # No rank starts sending until rank 0 (which reports) has read the counter: without
        # this the other ranks' first bytes fell before it and went uncounted (−8% once).
        dist.barrier()
        for _ in range(3):
            run()
        dist.barrier()
        result[name] = (loopback_bytes() - before) / 3 / world
    return result


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, Any] = {"buffers": buffers(rank, world), "training": {}}
    models = {}
    for how in ("ring", "hierarchical", "flat"):
        losses, models[how] = train(rank, how)
        result["training"][how] = {"losses": losses}
    for how in ("hierarchical", "flat"):
        result["training"][how]["max_weight_diff"] = max(
            float((a - b).detach().abs().max())
            for a, b in zip(models[how].parameters(), models["ring"].parameters(), strict=True)
        )
    result["compressed"] = compressed(rank)
    result["decentral"] = decentral(rank, world)
    result["wire"] = wire(rank, world)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(result, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
