"""Run under torchrun (2 ranks) by test_compression.py: every compressor averages the same
per-rank gradients through a real DDP bucket, step after step; rank 0 writes, per method, the
error of one step, the error of the running sum against the exact one (error feedback must
make it shrink like 1/steps), the bytes per step, and whether the ranks agreed.

    torchrun --nproc-per-node 2 tests/training/compression_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.compression import build_compressor
from trainer.config import CompressionConfig, PowerSGDConfig, TopKConfig

METHODS = {
    "fp16": CompressionConfig(method="fp16"),
    "bf16": CompressionConfig(method="bf16"),
    "powersgd": CompressionConfig(method="powersgd", powersgd=PowerSGDConfig(rank=4), start_step=2),
    "topk": CompressionConfig(method="topk", topk=TopKConfig(ratio=0.01), start_step=2),
    "sign": CompressionConfig(method="sign", start_step=2),
    # Gradients of rank 3 (no noise): rank-4 PowerSGD must pass them through exactly.
    "powersgd_lowrank": CompressionConfig(
        method="powersgd", powersgd=PowerSGDConfig(rank=4), start_step=2
    ),
}
ROWS, COLS = 256, 128
STEPS = 802  # 2 dense warm-up steps, then 800 compressed ones


class Probe(nn.Module):
    """loss = Σ W·A + Σ b·c: the gradient is (A, c), chosen per rank."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(ROWS, COLS))
        self.bias = nn.Parameter(torch.zeros(COLS))

    def forward(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (self.weight * a).sum() + (self.bias * c).sum()


def gradients(rank: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """A low-rank part plus noise, like real gradient matrices. Without noise, every rank's
    matrix is a multiple of one rank-3 matrix, so their mean has rank 3 too."""
    generator = torch.Generator().manual_seed(100 + (rank if noise else 0))
    low = torch.randn(ROWS, 3, generator=generator) @ torch.randn(3, COLS, generator=generator)
    if not noise:
        return (1 + rank) * low, torch.randn(COLS, generator=generator) + rank
    high = noise * torch.randn(ROWS, COLS, generator=generator)
    return low + high, torch.randn(COLS, generator=generator)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


def run(name: str, config: CompressionConfig) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo")
    model = DistributedDataParallel(Probe(), process_group=group, gradient_as_bucket_view=True)
    compressor = build_compressor(config)
    assert compressor is not None
    compressor.name_parameters(model.module)
    model.register_comm_hook(group, compressor.hook)
    noise = 0.0 if name.endswith("lowrank") else 0.3
    a, c = gradients(rank, noise)
    exact = sum(torch.cat([g[0].reshape(-1), g[1]])
                for g in (gradients(r, noise) for r in range(world))) / world  # fmt: skip
    total = torch.zeros_like(exact)
    running: dict[int, float] = {}
    first_error, sent, dense, agreed = 0.0, 0, 0, True
    for step in range(STEPS):
        model.zero_grad(set_to_none=False)
        model(a, c).backward()
        compressor.step_done()
        got = flat(model)
        mine = got.clone()
        theirs = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(theirs, mine, group=group)
        agreed &= all(torch.equal(theirs[0], t) for t in theirs)
        compressed = step - 2
        bytes_sent, bytes_dense = compressor.take_bytes()
        if compressed < 0:
            continue
        if compressed == 0:
            first_error = float((got - exact).norm() / exact.norm())
            sent, dense = bytes_sent, bytes_dense
        total += got
        count = compressed + 1
        if count in (10, 100, 200, 400, 800):
            running[count] = float((total - count * exact).norm() / (count * exact.norm()))
    dist.destroy_process_group(group)
    return {"first_step_error": first_error, "running_error": running, "bytes_sent": sent,
            "bytes_dense": dense, "ranks_agree": agreed}  # fmt: skip


def main() -> None:
    dist.init_process_group("gloo")
    results = {name: run(name, config) for name, config in METHODS.items()}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
