"""One training step and one evaluation pass over whatever parallel layout was built.

Without pipeline parallelism a step is forward → loss → backward on the single model part
(DDP's buckets and FSDP's prefetch overlap communication with backward inside it). With
pp > 1 the schedule runs forward and backward over the microbatches; stage 0 feeds the
inputs, the last stage the targets and the loss. Logged losses are means over the global
batch: each rank holding the loss adds its share, weighted so that tensor-parallel copies
count once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.parallel import Layout, ParallelModel

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
MetricsFn = Callable[[Any, torch.Tensor], dict[str, torch.Tensor]]


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (fp32 master weights stay as they are); a no-op when off."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def forward_backward(
    model: ParallelModel,
    inputs: Any,
    targets: torch.Tensor,
    *,
    precision: Any,
    on_output: Callable[[Any, torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """Accumulate gradients of the mean loss; returns this rank's loss (None off the last
    stage). ``on_output(output, targets)`` sees the model's output — with pp > 1 each
    microbatch's, on the last stage — e.g. to count correct predictions."""
    loss_fn: LossFn = model.loss_fn  # type: ignore[assignment]
    with precision:
        if model.schedule is None:
            output = model.parts[0](inputs)
            loss = loss_fn(output, targets)
            if on_output is not None:
                on_output(output, targets)
            loss.backward()
            model.sync.after_backward()
            return loss.detach()
        losses: list[torch.Tensor] = []
        assert model.observed is not None
        model.observed.observer = on_output
        try:
            if model.first_stage and model.last_stage:
                model.schedule.step(inputs, target=targets, losses=losses)
            elif model.first_stage:
                model.schedule.step(inputs)
            elif model.last_stage:
                model.schedule.step(target=targets, losses=losses)
            else:
                model.schedule.step()
        finally:
            model.observed.observer = None
    return torch.stack(losses).mean().detach() if model.last_stage else None


def global_mean(layout: Layout, model: ParallelModel, value: torch.Tensor | None) -> float:
    """The mean over data-parallel ranks of a per-rank scalar held by the last stage."""
    if layout.world_size == 1:
        assert value is not None
        return float(value)
    share = torch.zeros((), dtype=torch.float64)
    if value is not None and model.last_stage:
        share = value.detach().double().cpu() / (layout.dp_world * layout.tp)
    dist.all_reduce(share)
    return float(share)


def clip_gradients(layout: Layout, parts: list[nn.Module], max_norm: float) -> float:
    """Clip the global gradient norm (over shards, tp copies and pipeline stages)."""
    squares = torch.zeros((), dtype=torch.float64)
    grads = []
    for part in parts:
        for param in part.parameters():
            if param.grad is None:
                continue
            grad = param.grad
            grads.append(grad)
            if isinstance(grad, DTensor):
                # Norm of a sharded tensor: a DTensor reduction; full_tensor() sums the shards.
                squares += torch.linalg.vector_norm(grad).full_tensor().double().cpu() ** 2
            else:
                squares += torch.linalg.vector_norm(grad).double().cpu() ** 2
    if layout.pp > 1:  # stages hold disjoint parameters
        dist.all_reduce(squares, group=layout.group("pp"))
    norm = float(squares.sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return norm


@torch.no_grad()
def evaluate(
    model: ParallelModel, layout: Layout, batches: Any, split: Callable[[Any], Any], *,
    precision: Any, metrics: MetricsFn | None = None,
) -> dict[str, float]:  # fmt: skip
    """Mean loss and ``metrics`` (sums per batch, reported per target entry: top-1 accuracy
    for the reference tasks) over the valid samples."""
    loss_fn: LossFn = model.loss_fn  # type: ignore[assignment]
    names: list[str] = []
    totals: torch.Tensor | None = None  # loss sum, count, then each metric's sum
    for part in model.parts:
        part.eval()
    try:
        for batch in batches:
            inputs, targets = split(batch)
            valid = batch["__valid__"].to(targets.device)
            with precision:
                if model.schedule is None:
                    output: Any = model.parts[0](inputs)
                elif model.first_stage and model.last_stage:
                    output = model.schedule.eval(inputs, target=targets)
                elif model.first_stage:
                    output = model.schedule.eval(inputs)
                elif model.last_stage:
                    output = model.schedule.eval(target=targets)
                else:
                    output = model.schedule.eval()
            if output is None or not model.last_stage:
                continue
            output = output[valid].float()
            kept = targets[valid]
            sums = metrics(output, kept) if metrics is not None else {}
            if totals is None:
                names = sorted(sums)
                totals = torch.zeros(2 + len(names), dtype=torch.float64)
            per_position = loss_fn(output, kept) * kept.numel()
            row = [float(per_position), kept.numel(), *(float(sums[name]) for name in names)]
            totals += torch.tensor(row) * (1.0 / layout.tp)
    finally:
        for part in model.parts:
            part.train()
    if layout.world_size > 1:
        # Ranks that held no batch (or no last stage) learn the metric names from the others.
        everyone: list[Any] = [None] * layout.world_size
        dist.all_gather_object(everyone, names)
        names = next((n for n in everyone if n), [])
        if totals is None:
            totals = torch.zeros(2 + len(names), dtype=torch.float64)
        dist.all_reduce(totals)
    if totals is None:
        totals = torch.zeros(2 + len(names), dtype=torch.float64)
    count = max(float(totals[1]), 1.0)
    result = {"loss": float(totals[0]) / count}
    result.update({name: float(totals[2 + i]) / count for i, name in enumerate(names)})
    result["targets"] = round(float(totals[1]))
    return result
