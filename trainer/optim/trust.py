"""LAMB and LARS: layer-wise trust ratios whose norms are those of the full tensors.

A trust ratio ‖w‖ / ‖update‖ needs each parameter's *whole* norm. Under FSDP2 or tensor
parallelism a parameter is a DTensor holding one shard per rank, so the local norm is wrong.
``full_squared_norms`` sums the local squares of many tensors at once and all-reduces them
over the mesh dimensions that shard them: one collective per distinct (mesh, sharded
dimensions) — in practice one or two per step for the whole model — never one per
parameter. Replicated tensors (DDP, Replicate placements) need no collective at all.

Parameters with one dimension or fewer (biases, norm gains) take no weight decay and no
trust ratio when ``exclude_bias_and_norm`` is on (the papers' recommendation); their ratio
is 1.

    LAMB (You et al., 2019)   Adam moments with bias correction; u = m̂ / (√v̂ + ε) + λw;
                              w ← w − lr · ‖w‖/‖u‖ · u
    LARS (You et al., 2017)   local = η‖w‖ / (‖g‖ + λ‖w‖); with LARC clipping
                              local = min(local, lr) / lr; buf ← μ·buf + local·(g + λw);
                              w ← w − lr · buf
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def full_squared_norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """‖t‖² of every tensor as if it were whole, in fp32, with one all-reduce per group of
    tensors sharded over the same mesh dimensions."""
    squares: list[torch.Tensor] = []
    groups: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
    for position, tensor in enumerate(tensors):
        local = tensor
        if isinstance(tensor, DTensor):
            if any(placement.is_partial() for placement in tensor.placements):
                raise ValueError("a trust ratio needs reduced tensors, got a Partial DTensor")
            local = tensor.to_local()
            # Every placement that does not replicate splits the tensor — Shard, and FSDP2's
            # _StridedShard over TP, whose is_shard() is False.
            dims = tuple(d for d, p in enumerate(tensor.placements) if not p.is_replicate())
            if dims:
                # DeviceMesh hashes by its ranks and names: equal sub-meshes share a group.
                groups.setdefault((tensor.device_mesh, dims), []).append(position)
        squares.append(local.detach().float().pow(2).sum())
    if not squares:
        return []
    stacked = torch.stack(squares)
    for (mesh, dims), positions in groups.items():
        index = torch.tensor(positions, device=stacked.device)
        partial = stacked.index_select(0, index)
        for dim in dims:
            dist.all_reduce(partial, group=mesh.get_group(dim))
        stacked.index_copy_(0, index, partial)
    return stacked.tolist()


def _adapts(param: torch.Tensor, group: dict[str, Any]) -> bool:
    return not (group["exclude_bias_and_norm"] and param.dim() <= 1)


class Lamb(torch.optim.Optimizer):
    def __init__(
        self, params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float],
        eps: float = 1e-6, weight_decay: float = 0.0, exclude_bias_and_norm: bool = True,
    ) -> None:  # fmt: skip
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        exclude_bias_and_norm=exclude_bias_and_norm)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for param in params:
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = int(state["step"].item())
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denominator = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1**step)).div_(denominator)
                if group["weight_decay"] and _adapts(param, group):
                    update.add_(param, alpha=group["weight_decay"])
                updates.append(update)
            adapting = [i for i, param in enumerate(params) if _adapts(param, group)]
            norms = full_squared_norms([params[i] for i in adapting] +
                                       [updates[i] for i in adapting])  # fmt: skip
            ratios = [1.0] * len(params)
            for k, i in enumerate(adapting):
                weight, update_norm = norms[k] ** 0.5, norms[len(adapting) + k] ** 0.5
                ratios[i] = weight / update_norm if weight > 0 and update_norm > 0 else 1.0
            for param, update, ratio in zip(params, updates, ratios, strict=True):
                param.add_(update, alpha=-group["lr"] * ratio)
        return loss


class Lars(torch.optim.Optimizer):
    def __init__(
        self, params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float = 0.9,
        weight_decay: float = 0.0, trust_coefficient: float = 0.001, eps: float = 1e-8,
        clip: bool = False, exclude_bias_and_norm: bool = True,
    ) -> None:  # fmt: skip
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, clip=clip,
                        exclude_bias_and_norm=exclude_bias_and_norm)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            adapting = [i for i, param in enumerate(params) if _adapts(param, group)]
            norms = full_squared_norms([params[i] for i in adapting] +
                                       [params[i].grad for i in adapting])  # fmt: skip
            scales = [1.0] * len(params)
            decayed = set(adapting) if decay else set()
            for k, i in enumerate(adapting):
                weight, grad = norms[k] ** 0.5, norms[len(adapting) + k] ** 0.5
                if weight > 0 and grad > 0:
                    local = group["trust_coefficient"] * weight / (grad + decay * weight
                                                                   + group["eps"])  # fmt: skip
                    scales[i] = min(local / lr, 1.0) if group["clip"] else local
            for i, param in enumerate(params):
                direction = param.grad
                if i in decayed:
                    direction = direction.add(param, alpha=decay)
                direction = direction.mul(scales[i])
                state = self.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = direction.clone()
                else:
                    buffer.mul_(group["momentum"]).add_(direction)
                param.add_(buffer, alpha=-lr)
        return loss
