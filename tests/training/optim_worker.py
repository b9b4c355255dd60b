"""Run under torchrun by test_optim.py: each optimizer steps a GPT that is sharded with the
given layout, and the same GPT unsharded in this process; the parameters are compared after
every step. Writes one JSON result per optimizer to argv[2] (rank 0).

    torchrun --nproc-per-node N tests/training/optim_worker.py LAYOUT OUT.json
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import torch
import torch.distributed as dist

from trainer.config import (
    GPTConfig,
    LambConfig,
    LarsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
)
from trainer.optim import build_optimizer, trust
from trainer.parallel import build_layout, parallelize
from trainer.step import forward_backward

LAYOUTS = {
    "fsdp": ParallelConfig(dp_shard=2),
    "tp": ParallelConfig(tp=2),
    "fsdp-tp": ParallelConfig(dp_shard=2, tp=2),
}
OPTIMIZERS = {
    "lamb": OptimConfig(name="lamb", lr=0.02, weight_decay=0.01, lamb=LambConfig(eps=1e-6)),
    "lars": OptimConfig(name="lars", lr=0.5, weight_decay=1e-4,
                        lars=LarsConfig(trust_coefficient=0.02)),
    "lars-larc": OptimConfig(name="lars", lr=0.5, weight_decay=1e-4,
                             lars=LarsConfig(trust_coefficient=0.02, larc_clip=True)),
    "adamw": OptimConfig(name="adamw", lr=0.01, weight_decay=0.01),
    # The control: LAMB with each rank's local norms (no collective) must visibly differ.
    "lamb-local-norms": OptimConfig(name="lamb", lr=0.02, weight_decay=0.01,
                                    lamb=LambConfig(eps=1e-6)),
}  # fmt: skip
MODEL = ModelConfig(name="gpt", gpt=GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2,
                                              heads=4))  # fmt: skip
STEPS = 3
SEED = 3


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def run(layout_name: str, optimizer_name: str) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    optim = OPTIMIZERS[optimizer_name]
    layout = build_layout(LAYOUTS[layout_name], rank=rank, world_size=world, device_type="cpu")
    alone = build_layout(ParallelConfig(), rank=0, world_size=1, device_type="cpu")
    sharded = parallelize(MODEL, LAYOUTS[layout_name], layout=layout, device=torch.device("cpu"),
                          num_classes=0, seed=SEED)  # fmt: skip
    whole = parallelize(MODEL, ParallelConfig(), layout=alone, device=torch.device("cpu"),
                        num_classes=0, seed=SEED)  # fmt: skip
    optimizers = [build_optimizer(optim, m.parts[0].parameters()) for m in (sharded, whole)]
    generator = torch.Generator().manual_seed(SEED)
    collectives: list[int] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        collectives[-1] += 1
        if optimizer_name == "lamb-local-norms":
            return None
        return real_all_reduce(*args, **kwargs)

    differences = []
    for _ in range(STEPS):
        # Every rank the same batch: FSDP's averaged gradient is then the whole batch's.
        gpt = MODEL.gpt
        tokens = torch.randint(0, gpt.vocab_size, (4, gpt.seq_len + 1), generator=generator)
        for model, optimizer in zip((sharded, whole), optimizers, strict=True):
            forward_backward(model, tokens[:, :-1], tokens[:, 1:],
                             precision=contextlib.nullcontext())  # fmt: skip
            collectives.append(0)
            trust.dist.all_reduce = counting_all_reduce  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                trust.dist.all_reduce = real_all_reduce  # type: ignore[attr-defined]
            optimizer.zero_grad(set_to_none=True)
        mine = dict(sharded.parts[0].named_parameters())
        worst = 0.0
        for name, reference in whole.parts[0].named_parameters():
            got = full(mine[name].detach())
            scale = reference.detach().abs().max().clamp_min(1e-3)
            worst = max(worst, float((got - reference.detach()).abs().max() / scale))
        differences.append(worst)
    moved = max(
        float((full(p.detach()) - q.detach()).abs().max())
        for p, q in zip(sharded.parts[0].parameters(),
                        parallelize(MODEL, ParallelConfig(), layout=alone,
                                    device=torch.device("cpu"), num_classes=0,
                                    seed=SEED).parts[0].parameters(), strict=True)
    )  # fmt: skip
    parameters = sum(1 for _ in sharded.parts[0].parameters())
    return {"differences": differences, "collectives_per_step": collectives[0::2],
            "parameters": parameters, "moved": moved}  # fmt: skip


def main() -> None:
    layout_name, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results: dict[str, Any] = {name: run(layout_name, name) for name in OPTIMIZERS}
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = build_layout(LAYOUTS[layout_name], rank=rank, world_size=world, device_type="cpu")
    sharded = parallelize(MODEL, LAYOUTS[layout_name], layout=layout, device=torch.device("cpu"),
                          num_classes=0, seed=SEED)  # fmt: skip
    try:
        build_optimizer(OptimConfig(name="adafactor"), sharded.parts[0].parameters())
        results["adafactor_error"] = ""
    except ValueError as error:
        results["adafactor_error"] = str(error)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
