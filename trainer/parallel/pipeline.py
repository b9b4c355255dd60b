"""Pipeline parallelism: cut the model into stages, run a microbatch schedule.

The model is built whole on the meta device (no memory), then each stage is a deep copy
with the other stages' units deleted, so parameter names match the unsplit model and
checkpoints move between layouts (torchtitan's manual split). Where the cuts go:

- ``ModelSpec.pp_cut_points`` (any module): the units where each later stage begins, in
  forward order (torchtitan's ``pipeline_parallel_split_points``). A unit is a child of the
  module, or an item of a child that is a ``ModuleList``/``ModuleDict``/``Sequential``
  (``"layers.4"``). A unit outside a stage is deleted from its container, or set to None on
  the module: the forward must skip None children and iterate (not index) its containers,
  as ``StagedModel.forward`` does.
- else a ``StagedModel``: blocks split as evenly as possible, the input layer on stage 0,
  the output layer on the last stage.

Stages number ``pp × stages_per_rank``; with the interleaved schedule rank r holds stages
r, r + pp, r + 2·pp, … (fewer bubbles, more messages). ``torch.distributed.pipelining``
sends activations and gradients between neighbouring stages and scales gradients by
1 / microbatches, so a step computes the gradient of the mean loss over the per-rank batch.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Sequence

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
    keep = [f"blocks.{name}" for name in split_blocks(list(model.blocks.keys()), stages)[stage]]
    if stage == 0:
        keep.append("input_layer")
    if stage == stages - 1:
        keep.append("output_layer")
    part: StagedModel = cut_module(model, keep)  # type: ignore[assignment]
    return part


CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def pipeline_units(module: nn.Module) -> list[str]:
    """The units a pipeline may cut between, in forward (registration) order."""
    if isinstance(module, CONTAINERS):
        return list(module._modules)
    units: list[str] = []
    for name, child in module.named_children():
        if isinstance(child, CONTAINERS):
            units.extend(f"{name}.{item}" for item in child._modules)
        else:
            units.append(name)
    return units


def stage_units(module: nn.Module, cut_points: Sequence[str], stages: int,
                *, described: str) -> list[list[str]]:  # fmt: skip
    """The units of each stage, by ``cut_points``; a ValueError names what is wrong."""
    units = pipeline_units(module)
    where = f"ModelSpec.pp_cut_points of {described}"
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(
            f"{where}: the module holds parameter {own[0]!r} itself, outside every unit, so no "
            "stage could own it; move it into a submodule"
        )
    starts = [0]
    for point in cut_points:
        if point not in units:
            close = difflib.get_close_matches(point, units, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: {point!r} is no unit{hint} (units, in order: "
                             f"{', '.join(units)})")  # fmt: skip
        index = units.index(point)
        if index <= starts[-1]:
            raise ValueError(f"{where}: {point!r} does not come after the previous cut; list "
                             f"the cut points in forward order: {', '.join(units)}")  # fmt: skip
        starts.append(index)
    if len(starts) != stages:
        raise ValueError(
            f"{where}: {len(cut_points)} cut points make {len(starts)} stages; the layout runs "
            f"{stages} (parallel.pp × stages_per_rank with the interleaved schedule)"
        )
    ends = [*starts[1:], len(units)]
    return [units[start:end] for start, end in zip(starts, ends, strict=True)]


def cut_module(module: nn.Module, keep: Sequence[str]) -> nn.Module:
    """A copy of ``module`` holding only the units ``keep`` (same parameter names)."""
    part = copy.deepcopy(module)
    for unit in pipeline_units(module):
        if unit in keep:
            continue
        parent, _, leaf = unit.rpartition(".")
        owner = part.get_submodule(parent) if parent else part
        if isinstance(owner, CONTAINERS):
            del owner._modules[leaf]
        else:
            setattr(owner, leaf, None)
    return part


def split_stage(module: nn.Module, cut_points: Sequence[str], stage: int, stages: int,
                *, described: str) -> nn.Module:  # fmt: skip
    """What stage ``stage`` of ``stages`` runs: cut at ``cut_points``, else a StagedModel
    split evenly between its blocks."""
    if cut_points:
        return cut_module(module, stage_units(module, cut_points, stages,
                                              described=described)[stage])  # fmt: skip
    if isinstance(module, StagedModel):
        return split_model(module, stage, stages)
    raise ValueError(
        f"parallel.pp > 1 needs to know where to cut the model; {described} built a "
        f"{type(module).__name__}: give ModelSpec.pp_cut_points (the units where each later "
        f"stage begins, of {', '.join(pipeline_units(module))}), subclass "
        "trainer.models.StagedModel, or set parallel.pp = 1"
    )


class ObservedLoss:
    """The task's loss as the schedule calls it on each microbatch of the last stage, which
    first shows (output, target) to ``observer`` when one is set (the loop's training
    metrics: the schedule keeps the outputs to itself)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(output, target)
        return self.loss_fn(output, target)


def build_schedule(
    config: ParallelConfig,
    parts: list[nn.Module],
    stage_ids: list[int],
    stages: int,
    *,
    device: torch.device,
    group: ProcessGroup,
    loss_fn: ObservedLoss,
) -> Schedule:
    pipeline_stages: list[_PipelineStageBase] = [
        PipelineStage(part, index, stages, device, group=group)
        for part, index in zip(parts, stage_ids, strict=True)
    ]
    if config.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipeline_stages, config.microbatches, loss_fn=loss_fn)
    kind = ScheduleGPipe if config.pp_schedule == "gpipe" else Schedule1F1B
    return kind(pipeline_stages[0], config.microbatches, loss_fn=loss_fn)
