"""Pipeline parallelism: cut the model between blocks, run a microbatch schedule.

The model is built whole on the meta device (no memory), then each stage is a deep copy
with the other stages' blocks deleted — the input layer stays on stage 0, the output layer
on the last stage — so parameter names match the unsplit model and checkpoints move
between layouts. Blocks are split as evenly as possible over ``pp × stages_per_rank``
stages; with the interleaved schedule rank r holds stages r, r + pp, r + 2·pp, …
(fewer bubbles, more messages). ``torch.distributed.pipelining`` sends activations and
gradients between neighbouring stages and scales gradients by 1 / microbatches, so a step
computes the gradient of the mean loss over the whole per-rank batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.pipelining.stage import _PipelineStageBase

from trainer.config import ParallelConfig
from trainer.models.base import StagedModel

Schedule = PipelineScheduleSingle | PipelineScheduleMulti


def stage_indices(config: ParallelConfig, pp_rank: int) -> tuple[list[int], int]:
    """(stages of this rank, total stages)."""
    per_rank = config.stages_per_rank if config.pp_schedule == "interleaved_1f1b" else 1
    total = config.pp * per_rank
    return [pp_rank + k * config.pp for k in range(per_rank)], total


def split_blocks(names: list[str], stages: int) -> list[list[str]]:
    """Contiguous, near-equal runs of block names, one per stage."""
    if len(names) < stages:
        raise ValueError(
            f"the model has {len(names)} blocks, too few for {stages} pipeline stages; "
            "lower parallel.pp (or stages_per_rank), or add blocks"
        )
    base, extra = divmod(len(names), stages)
    runs, start = [], 0
    for stage in range(stages):
        size = base + (1 if stage < extra else 0)
        runs.append(names[start : start + size])
        start += size
    return runs


def split_model(model: StagedModel, stage: int, stages: int) -> StagedModel:
    """The part of ``model`` that stage ``stage`` of ``stages`` runs (same parameter names)."""
    keep = set(split_blocks(list(model.blocks.keys()), stages)[stage])
    part = copy.deepcopy(model)
    for name in list(part.blocks.keys()):
        if name not in keep:
            del part.blocks[name]
    if stage != 0:
        part.input_layer = None
    if stage != stages - 1:
        part.output_layer = None
    return part


def build_schedule(
    config: ParallelConfig,
    parts: list[nn.Module],
    stage_ids: list[int],
    stages: int,
    *,
    device: torch.device,
    group: ProcessGroup,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Schedule:
    pipeline_stages: list[_PipelineStageBase] = [
        PipelineStage(part, index, stages, device, group=group)
        for part, index in zip(parts, stage_ids, strict=True)
    ]
    if config.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipeline_stages, config.microbatches, loss_fn=loss_fn)
    kind = ScheduleGPipe if config.pp_schedule == "gpipe" else Schedule1F1B
    return kind(pipeline_stages[0], config.microbatches, loss_fn=loss_fn)
